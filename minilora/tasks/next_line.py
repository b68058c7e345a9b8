"""next-line: which of four lines really comes next in the First Folio? Multiple choice by likelihood.

An item is a stretch of a play, whole lines of at most ``CONTEXT_CHARS`` characters, and four
candidate next lines: the real one and three drawn at random from elsewhere in the same split. The
model ranks them by log-likelihood per byte (likelihood.py says why per byte); a uniform guess is
right 1 time in 4, the baseline. The lines come from ``shakespeare_folio``, the corpus the README's
fine-tune learns, and the scored items from its validation split, three plays that no training
window contains. This task has no training file: a fine-tune learns it from the corpus itself
(``minilora finetune --corpus shakespeare_folio``).
"""

from __future__ import annotations

import functools

from ..io.data import load_corpus
from .likelihood import choice_accuracy
from .task import ChoiceItem, TaskScore, draw, item_rng, shuffled_options

SOURCE = "shakespeare_folio"
OPTIONS = 4
MIN_LINE_CHARS = 20  # shorter lines ("Exeunt.", a speaker's name) say too little to be told apart
CONTEXT_CHARS = 200  # at most this much of the play before the line, in whole lines (at least one)


@functools.cache
def split_lines(split: str) -> tuple[str, ...]:
    """The lines of one split of the Folio, without their newlines."""
    return tuple(getattr(load_corpus(SOURCE), split).tobytes().decode("utf-8").split("\n"))


@functools.cache
def candidates(split: str) -> tuple[int, ...]:
    """Indices of the lines long enough to be asked about, or offered as a wrong answer (not the first)."""
    lines = split_lines(split)
    return tuple(i for i in range(1, len(lines)) if len(lines[i].strip()) >= MIN_LINE_CHARS)


def context_before(lines: tuple[str, ...], i: int) -> str:
    """The whole lines before line ``i``, at most CONTEXT_CHARS characters of them (at least one line)."""
    start = i - 1
    while start > 0 and sum(len(line) + 1 for line in lines[start - 1 : i]) <= CONTEXT_CHARS:
        start -= 1
    return "".join(line + "\n" for line in lines[start:i])


class NextLine:
    """Pick the real next line of the Folio among four (see the module docstring)."""

    name = "next-line"
    metric = "accuracy, options ranked by log-likelihood per byte"
    baseline_is = f"uniform guess, 1/{OPTIONS}"
    default_items = 200

    def items(self, split: str, n: int, seed: int) -> list[ChoiceItem]:
        rng, lines, pool = item_rng(split, n, seed), split_lines(split), candidates(split)
        items = []
        for i in draw(pool, n, rng):
            others = (lines[j] + "\n" for j in draw(pool, 2 * OPTIONS, rng) if lines[j] != lines[i])
            wrong = list(dict.fromkeys(others))  # distinct texts: a line may occur twice in a play
            options, label = shuffled_options(lines[i] + "\n", wrong[: OPTIONS - 1], rng)
            items.append(ChoiceItem(context_before(lines, i), options, label))
        return items

    def score(self, model, tokenizer, items: list[ChoiceItem], progress: bool = False) -> TaskScore:
        return choice_accuracy(model, tokenizer, items, progress, self.name)

    def baseline(self, items: list[ChoiceItem]) -> float:
        return 1 / OPTIONS

    def training_conversations(self, n: int, seed: int) -> list[list[dict]]:
        raise ValueError(
            f"{self.name} has no training file: its items are lines of {SOURCE}, so fine-tune on the corpus "
            f"itself (minilora finetune --corpus {SOURCE})"
        )
