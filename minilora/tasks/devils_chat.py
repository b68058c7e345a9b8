"""devils-chat: asked what the Devil's Dictionary says about a word, does the model answer with Bierce's entry?

The question is the chat corpus's own (io/chat_data.py): the user asks "What does the Devil's
Dictionary say about adage?" and the assistant's reply starts, as every entry does, with the
headword and its part of speech, "ADAGE, n.". That much goes into the context (the prompt is
rendered with the chat template, generation prompt included), and four definitions are offered
after it: Bierce's own and three of other entries of the same split. Only the answer is scored:
the log-likelihood per byte of each definition given the conversation so far (likelihood.py), and
the item is right when Bierce's ranks first. A uniform guess is right 1 time in 4, the baseline.

A definition is the entry's first sentence, cut at ``MAX_DEFINITION_CHARS`` on a word boundary, so
that an option fits the shipped GPT's 256 positions with the question before it. Entries in verse
(the headword alone on its line) have no first sentence and are not asked about. The held-out items
are the validation split's entries less the verse and the one word the training split asks about
too: 93 of them. ``training_conversations`` writes the training split's conversations as the chat
corpus renders them, whole entries: what ``finetune --corpus devils_dictionary_chat`` trains on.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ..io.chat_data import dictionary_conversations
from ..io.data import load_corpus
from ..io.smollm2 import chat_prompt
from .likelihood import choice_accuracy
from .task import ChoiceItem, TaskScore, draw, item_rng, shuffled_options

OPTIONS = 4
MAX_DEFINITION_CHARS = 160
# "ADAGE, n.  Boned wisdom ...": the headword and part of speech, the spaces after them, the definition.
ENTRY = re.compile(r"(?P<head>[A-Z][A-Z'\- ]*, \S+)(?P<gap> +)(?P<definition>\S.*)", re.DOTALL)
FIRST_SENTENCE = re.compile(r".*?\.(?=  |\n|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Entry:
    """One entry as an item uses it: the user's question, the reply's head ("ADAGE, n."), the first sentence."""

    question: str
    head: str
    gap: str  # the spaces between the head and the definition
    definition: str


def first_sentence(definition: str) -> str | None:
    """The definition's first sentence, cut at MAX_DEFINITION_CHARS on a word boundary; None if it has none."""
    match = FIRST_SENTENCE.match(definition)
    if match is None:
        return None
    sentence = match.group()
    if len(sentence) > MAX_DEFINITION_CHARS:
        sentence = sentence[:MAX_DEFINITION_CHARS].rsplit(" ", 1)[0]
    return sentence


@functools.cache
def conversations(split: str) -> tuple:
    """The chat corpus's conversations of one split of the Devil's Dictionary: [question, Bierce's entry]."""
    return tuple(
        dictionary_conversations(getattr(load_corpus("devils_dictionary"), split).tobytes().decode())
    )


@functools.cache
def entries(split: str) -> tuple[Entry, ...]:
    """The entries of ``split`` that can be asked about: in prose, and, held out, not asked in training too."""
    asked_in_training = {question["content"] for question, _ in conversations("train")}
    found = []
    for question, answer in conversations(split):
        match = ENTRY.fullmatch(answer["content"])
        sentence = first_sentence(match["definition"]) if match else None
        if sentence and (split == "train" or question["content"] not in asked_in_training):
            found.append(Entry(question["content"], match["head"], match["gap"], sentence))
    return tuple(found)


def chat_context(entry: Entry) -> str:
    """The conversation up to the definition: the question in the chat template, the reply's head."""
    return chat_prompt([{"role": "user", "content": entry.question}], add_generation_prompt=True) + entry.head


class DevilsChat:
    """Pick Bierce's definition of the word asked about among four (see the module docstring)."""

    name = "devils-chat"
    metric = "accuracy, the assistant's definitions ranked by log-likelihood per byte"
    baseline_is = f"uniform guess, 1/{OPTIONS}"
    default_items = 100

    def items(self, split: str, n: int, seed: int) -> list[ChoiceItem]:
        rng, pool = item_rng(split, n, seed), entries(split)
        items = []
        for entry in draw(pool, n, rng):
            wrong = [other.definition for other in draw(pool, OPTIONS, rng) if other != entry][: OPTIONS - 1]
            options, label = shuffled_options(entry.definition, wrong, rng)
            items.append(
                ChoiceItem(chat_context(entry), tuple(entry.gap + option for option in options), label)
            )
        return items

    def score(self, model, tokenizer, items: list[ChoiceItem], progress: bool = False) -> TaskScore:
        return choice_accuracy(model, tokenizer, items, progress, self.name)

    def baseline(self, items: list[ChoiceItem]) -> float:
        return 1 / OPTIONS

    def training_conversations(self, n: int, seed: int) -> list[list[dict]]:
        return [
            list(conversation) for conversation in draw(conversations("train"), n, item_rng("train", n, seed))
        ]
