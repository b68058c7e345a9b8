"""What every task is: its items, drawn by a seed from a split, a score, and the baseline beside it.

A task asks one kind of question many times. Its items come from one of two splits that never
share an item: ``"train"``, what a fine-tune may learn from (``training_conversations`` writes it
as chat data), and ``"val"``, the held-out items that ``score`` is meant for. The same seed always
draws the same items, and different seeds draw different ones, so a score can be repeated and its
spread over seeds measured. ``baseline`` is the score of a strategy that needs no model (a uniform
guess, echoing the question), computed on the same items, so that a score means something only
when it beats it.

Two kinds of item:

- ``AnswerItem``: a question and the one right answer, for a model to generate and be checked
  exactly (``generation.py``);
- ``ChoiceItem``: a context and k options, one of them right, for the model to rank by their
  log-likelihood (``likelihood.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..backend import host_rng

SPLITS = ("train", "val")  # what a fine-tune may see, and the held-out items a score is computed on


@dataclass(frozen=True)
class AnswerItem:
    """A question asked as the user's chat message, and the one answer that counts as right."""

    question: str
    answer: str


@dataclass(frozen=True)
class ChoiceItem:
    """A context, the options that may follow it, and which option (``label``) really does."""

    context: str
    options: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class TaskScore:
    """A task's score on some items (a fraction right, in [0, 1]) and further numbers on the same items."""

    score: float
    details: dict = field(default_factory=dict)  # e.g. {"accuracy_by_sum": 0.31}


class Task(Protocol):
    """The interface of every task (reverse_word.py, next_line.py, devils_chat.py)."""

    name: str  # what the command line calls it: "reverse-word"
    metric: str  # what the score counts, in words
    baseline_is: str  # what the baseline is, in words
    default_items: int  # how many items an evaluation scores when not told

    def items(self, split: str, n: int, seed: int) -> list: ...

    def score(self, model, tokenizer, items: list, progress: bool = False) -> TaskScore: ...

    def baseline(self, items: list) -> float: ...

    def training_conversations(self, n: int, seed: int) -> list[list[dict]]: ...


def item_rng(split: str, n: int, seed: int) -> np.random.Generator:
    """The generator that draws ``n`` items of ``split`` for ``seed``; ValueError naming a bad split or n.

    The split is part of the key, so the same seed draws unrelated items from the two splits.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < 1:
        raise ValueError(f"the number of items must be >= 1, got {n}")
    return host_rng(seed, SPLITS.index(split))


def draw(pool: Sequence, n: int, rng: np.random.Generator) -> list:
    """``n`` distinct members of ``pool`` in a random order (all of them, shuffled, if it has fewer)."""
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


def shuffled_options(
    right: str, wrong: Sequence[str], rng: np.random.Generator
) -> tuple[tuple[str, ...], int]:
    """The right option among the wrong ones at a random position: (options, position of the right one)."""
    options = [right, *wrong]
    order = rng.permutation(len(options))  # order[j]: which option goes to position j
    return tuple(options[i] for i in order), int(np.flatnonzero(order == 0)[0])
