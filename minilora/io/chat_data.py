"""Instruction data: conversations rendered in the chat format, to fine-tune a chat model on.

A chat model is fine-tuned on conversations, not on running text. Here a conversation becomes
training text by the model's own chat template (ChatML, ``smollm2.chat_prompt``), and the rendered
conversations, one after another, are an ordinary corpus: the same windows, batches and bits per
byte as any other text. Two sources:

- ``devils_dictionary_chat``, built from the shipped Devil's Dictionary: each entry is one exchange,
  the user asking "What does the Devil's Dictionary say about WORD?" and the assistant answering
  with Bierce's entry. Its training and validation splits are those of the shipped corpus, so no
  entry of one is in the other.
- a JSON Lines file (``*.jsonl``), one conversation per line, ``{"messages": [{"role": "user",
  "content": "..."}, {"role": "assistant", "content": "..."}]}`` as in the usual chat datasets; the
  last 10% of the conversations (at least one) are validation.

What this leaves out: masking the prompt out of the loss. The model is trained on every token,
the user's question and the template's markers too (a common simplification; the answer is most
of the text here), and bits per byte score the whole rendered conversation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .smollm2 import chat_prompt

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
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ChatDataError(f'{path}:{number}: expected {{"messages": [...]}} with at least one message')
        try:
            chat_prompt(messages)  # checks every message's role and content
        except ValueError as err:
            raise ChatDataError(f"{path}:{number}: {err}") from err
        conversations.append(messages)
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


def render(conversations: list[list[dict]]) -> bytes:
    """The conversations in the chat format, one after another, as UTF-8 bytes."""
    return "".join(chat_prompt(messages) for messages in conversations).encode("utf-8")


def split_conversations(conversations: list) -> tuple[list, list]:
    """The first ~90% for training, the rest (at least one) for validation, in file order."""
    n_val = max(1, len(conversations) * VAL_PERCENT // 100)
    return conversations[:-n_val], conversations[-n_val:]
