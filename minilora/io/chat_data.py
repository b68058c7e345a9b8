"""Instruction data: conversations in the chat format, with the assistant's tokens marked for the loss.

A chat model is fine-tuned on conversations, not on running text. A conversation is rendered by the
model's own chat template (ChatML, ``smollm2.chat_pieces``) and encoded to token ids, and every token
is marked trained or not: the assistant's replies (each with the ``<|im_end|>`` that ends it) are
trained, the system and user messages and the template's markers are not, so the loss scores only
what the model should learn to say (``training/examples.py``: masked targets, padded or packed rows).
``train_on_prompt`` trains on every token instead, the simplification of minilora 0.2. Bits per byte
then score the assistant's tokens alone.

Two sources:

- ``devils_dictionary_chat``, built from the shipped Devil's Dictionary: each entry is one exchange,
  the user asking "What does the Devil's Dictionary say about WORD?" and the assistant answering
  with Bierce's entry. Its training and validation splits are those of the shipped corpus, so no
  entry of one is in the other.
- a JSON Lines file (``*.jsonl``), one conversation per line, in either of the usual forms:
  ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}``
  (any number of turns, every assistant turn trained), or ``{"prompt": "...", "completion": "..."}``
  (one exchange: the user's prompt and the assistant's completion). Either may carry
  ``"system": "..."``, the conversation's own system prompt (else the template's default, unless the
  messages start with a system message). The last 10% of the conversations (at least one) are
  validation.

A conversation with no assistant turn has nothing to train on, and is refused with its line number.
The rendered conversations one after another (``ChatCorpus.train`` and ``.val``) are the text the
run's fingerprint and its token counts are taken of.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..training.evaluate import bits_per_byte_of
from ..training.examples import Batch, Example, ExampleSet
from .smollm2 import chat_pieces

DEVILS_DICTIONARY_CHAT = "devils_dictionary_chat"
QUESTION = "What does the Devil's Dictionary say about {word}?"
# An entry starts a line with its headword in capitals, a comma, its part of speech and a full stop:
# "ABRUPT, adj.  Sudden, ..."; it runs until the next such line.
ENTRY_START = re.compile(r"^(?=[A-Z][A-Z'\- ]*, [a-z][a-z. ]*\.)", re.MULTILINE)
HEADWORD = re.compile(r"([A-Z][A-Z'\- ]*), ")
VAL_PERCENT = 10


class ChatDataError(ValueError):
    """Conversations could not be read; the message names the file, the line and the problem."""


def dictionary_conversations(text: str) -> list[list[dict]]:
    """One question-and-answer exchange per entry of the Devil's Dictionary text."""
    conversations = []
    for entry in ENTRY_START.split(text):
        entry = entry.strip()
        match = HEADWORD.match(entry)
        if match is None:
            continue  # text before the first entry
        word = match.group(1).strip().lower()
        conversations.append(
            [{"role": "user", "content": QUESTION.format(word=word)}, {"role": "assistant", "content": entry}]
        )
    return conversations


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSON Lines file, each line checked: {"messages": [{"role", "content"}, ...]}."""
    path = Path(path)
    conversations = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        line = utf8_line(raw, path, number)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ChatDataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        try:
            conversations.append(conversation_of(record))
        except ValueError as err:
            raise ChatDataError(f"{path}:{number}: {err}") from err
    if len(conversations) < 2:
        raise ChatDataError(
            f"{path}: needs at least two conversations (training and validation), got {len(conversations)}"
        )
    return conversations


def utf8_line(raw: bytes, path: Path, number: int) -> str:
    """Line ``number`` of ``path`` as text; ChatDataError naming the file, the line and the byte if not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ChatDataError(
            f"{path}:{number}: not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} of the line"
        ) from None


def conversation_of(record) -> list[dict]:
    """The messages of one JSON Lines record, in either form (see the module), checked; ValueError if not."""
    if not isinstance(record, dict) or not ("messages" in record or "prompt" in record):
        raise ValueError('expected {"messages": [...]} or {"prompt": "...", "completion": "..."}')
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('expected {"messages": [...]} with at least one message')
    else:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record.get("completion")},
        ]
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str) or messages[0].get("role") == "system":
            raise ValueError(
                '"system" must be a string, and the messages must not start with a system message too'
            )
        messages = [{"role": "system", "content": system}, *messages]
    chat_pieces(messages)  # checks every message's role and content
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("the conversation has no assistant turn: there is nothing to train on")
    return messages


def render(conversations: list[list[dict]]) -> str:
    """The conversations in the chat format, one after another."""
    return "".join(text for messages in conversations for text, _ in chat_pieces(messages))


def encode_conversation(messages: list[dict], encode: Callable, train_on_prompt: bool = False) -> Example:
    """The conversation's token ids, and which are trained: the assistant's, or every one with train_on_prompt.

    Each piece of the template is encoded on its own; the pieces meet at special tokens, where the
    tokenizer splits the text anyway, so the ids are those of the whole text (a test checks this).
    """
    ids, trained = [], []
    for text, said in chat_pieces(messages):
        piece = encode(text)
        ids += piece
        trained += [said or train_on_prompt] * len(piece)
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool))


def utf8_bytes(text: str) -> list[int]:
    """The byte-level tokenizer: a text's token ids are its UTF-8 bytes."""
    return list(text.encode("utf-8"))


@dataclass(frozen=True, eq=False)
class ChatCorpus:
    """Training and validation conversations, encoded as the base's tokenizer does, with their loss masks.

    ``train`` and ``val`` (1-D read-only ids) are the rendered conversations one after another, as a
    text corpus's are; ``train_examples`` and ``val_examples`` are the conversations as examples, in
    the layout ``packing`` chooses. ``configured`` and ``encoded`` return copies with other choices.
    """

    name: str
    train_conversations: list
    val_conversations: list
    encode: Callable = utf8_bytes  # text -> token ids: the byte-level tokenizer unless ``encoded``
    token_bytes: np.ndarray | None = None  # (V,) UTF-8 bytes per token id; None: one byte per token
    train_on_prompt: bool = False
    packing: bool = False

    @functools.cached_property
    def train(self) -> np.ndarray:
        return self._ids(self.train_conversations)

    @functools.cached_property
    def val(self) -> np.ndarray:
        return self._ids(self.val_conversations)

    @functools.cached_property
    def train_examples(self) -> ExampleSet:
        return self._examples(self.train_conversations)

    @functools.cached_property
    def val_examples(self) -> ExampleSet:
        return self._examples(self.val_conversations)

    # What the training loop asks of a corpus, as a text corpus (io/data.py) answers it with windows.

    def train_batch(self, B: int, T: int, rng: np.random.Generator) -> Batch:
        """A (B, T) batch of training conversations drawn by ``rng``, padded or packed."""
        return self.train_examples.train_batch(B, T, rng)

    def val_bits_per_byte(
        self, model, batch_size: int, max_windows: int | None, progress: bool = False
    ) -> float:
        """The model's bits per byte on the validation conversations' scored tokens (``max_windows`` of them)."""
        batches = self.val_examples.evaluation_batches(batch_size, model.config.block_size, max_windows)
        return bits_per_byte_of(model, batches, self.token_bytes, progress)

    def evaluation_line(self, T: int, max_windows: int | None) -> str:
        """What ``val_bits_per_byte`` is about to score."""
        n = len(self.val_examples) if max_windows is None else min(max_windows, len(self.val_examples))
        scored = "the assistant's tokens" if not self.train_on_prompt else "every token"
        return f"evaluating val: {n:,} conversation{'s' if n != 1 else ''} of up to {T} tokens, on {scored}"

    def configured(self, train_on_prompt: bool = False, packing: bool = False) -> ChatCorpus:
        """This corpus with its loss mask (the assistant's tokens, or all) and its layout (padded or packed)."""
        return replace(self, train_on_prompt=train_on_prompt, packing=packing)

    def encoded(self, tokenizer) -> ChatCorpus:
        """This corpus in a subword tokenizer's ids (BPETokenizer, io/bpe.py), its bytes per id kept."""
        return replace(self, encode=tokenizer.encode, token_bytes=tokenizer.token_byte_lengths())

    def _ids(self, conversations: list) -> np.ndarray:
        ids = np.asarray(
            self.encode(render(conversations)), dtype=np.int32 if self.token_bytes is not None else np.uint8
        )
        ids.flags.writeable = False
        return ids

    def _examples(self, conversations: list) -> ExampleSet:
        examples = [encode_conversation(c, self.encode, self.train_on_prompt) for c in conversations]
        return ExampleSet(examples, self.packing)


def split_conversations(conversations: list) -> tuple[list, list]:
    """The first ~90% for training, the rest (at least one) for validation, in file order."""
    n_val = max(1, len(conversations) * VAL_PERCENT // 100)
    return conversations[:-n_val], conversations[-n_val:]
