"""reverse-word: spell a word backwards. A synthetic task whose every answer can be checked.

The words are the vocabulary of the shipped Shakespeare (modern spelling, training split): runs of
4 to 9 letters that occur at least ``MIN_COUNT`` times, lower-cased. Which split a word belongs to
is fixed by the word alone, through a hash (a fifth of the words are held out), so no seed and no
number of items can put a training word among the scored ones.

The question, ``Spell the word "honest" backwards.``, is asked as a chat message and the greedy reply
must be ``tsenoh`` (generation.py says what is normalised). A model that cannot do it scores 0, and
the baseline says what echoing the word unchanged would score: only the palindromes ("level",
"deed") among the items are right that way.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections import Counter

from ..io.data import load_corpus
from .generation import exact_match
from .task import AnswerItem, TaskScore, draw, item_rng

SOURCE = "shakespeare_modern"
WORD = re.compile(r"\b[a-z]{4,9}\b")  # in the lower-cased text: apostrophes and hyphens cut words
MIN_COUNT = 5  # rarer spellings are mostly names and misprints
HELD_OUT_EVERY = 5  # a word whose CRC-32 is 0 modulo 5 is held out
QUESTION = 'Spell the word "{word}" backwards.'


@functools.cache
def vocabulary(split: str) -> tuple[str, ...]:
    """The words of ``split``, sorted: those held out for "val", the others for "train"."""
    text = load_corpus(SOURCE).train.tobytes().decode("utf-8").lower()
    counts = Counter(WORD.findall(text))
    frequent = sorted(word for word, count in counts.items() if count >= MIN_COUNT)
    return tuple(word for word in frequent if (split == "val") == is_held_out(word))


def is_held_out(word: str) -> bool:
    """True if ``word`` belongs to the held-out split (by its CRC-32, the same on every machine)."""
    return zlib.crc32(word.encode("ascii")) % HELD_OUT_EVERY == 0


class ReverseWord:
    """Spell a word backwards; exact match of the greedy reply (see the module docstring)."""

    name = "reverse-word"
    metric = "exact match of the greedy reply"
    baseline_is = "echo the word unchanged (right for palindromes)"
    default_items = 50

    def items(self, split: str, n: int, seed: int) -> list[AnswerItem]:
        words = draw(vocabulary(split), n, item_rng(split, n, seed))
        return [AnswerItem(QUESTION.format(word=word), word[::-1]) for word in words]

    def score(self, model, tokenizer, items: list[AnswerItem], progress: bool = False) -> TaskScore:
        return exact_match(model, tokenizer, items, progress, self.name)

    def baseline(self, items: list[AnswerItem]) -> float:
        return sum(item.answer == item.answer[::-1] for item in items) / len(items)

    def training_conversations(self, n: int, seed: int) -> list[list[dict]]:
        return [
            [{"role": "user", "content": item.question}, {"role": "assistant", "content": item.answer}]
            for item in self.items("train", n, seed)
        ]
