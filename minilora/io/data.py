"""Corpora as byte arrays, and random (input, target) batches for next-token prediction.

A corpus is a training and a validation array of token ids; with the byte-level tokenizer the ids
are simply the UTF-8 bytes of the text, so loading is reading and checking a file. The shipped
corpora (built by data/build_corpora.py, described in data/README.md) come with fixed splits, and are
read from the checkout's data/ or, in a regular install, from the wheel's copy of it; any
other UTF-8 text file is split by one stated rule. A batch is B windows of T consecutive tokens at
random offsets, and the target of each position is the token that follows it. What this leaves out:
streaming corpora larger than memory, epochs and sampling without replacement, padding.

Shape letters: B batch size, T block size (context length).
"""

from __future__ import annotations

import functools
import lzma
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..training.batches import get_batch
from ..training.evaluate import bits_per_byte, evaluation_line
from ..training.examples import Batch
from . import chat_data
from .chat_data import DEVILS_DICTIONARY_CHAT, ChatCorpus

SHIPPED_CORPORA = ("shakespeare_modern", "shakespeare_folio", "kjv", "devils_dictionary")
PACKAGE_DATA_DIR = Path(__file__).resolve().parents[1] / "_data"  # a wheel's copy of data/ (setup.py)
CHECKOUT_DATA_DIR = Path(__file__).resolve().parents[2] / "data"  # the repository's data/ (editable install)
DATA_DIR = PACKAGE_DATA_DIR if PACKAGE_DATA_DIR.is_dir() else CHECKOUT_DATA_DIR
SHIPPED_BASE = DATA_DIR / "shakespeare_base.safetensors"  # the pretrained base model, see data/README.md
VAL_PERCENT = 10  # share of a user's text file that becomes validation, see split_text


class CorpusError(ValueError):
    """A corpus could not be found, read or split; the message names the problem."""


# eq=False: a generated __eq__ would compare arrays, which have no single truth value.
@dataclass(frozen=True, eq=False)
class Corpus:
    """A named corpus: training and validation token ids, 1-D read-only arrays.

    Byte-level (as loaded): uint8 bytes and token_bytes None. Through a subword tokenizer
    (``tokenize_corpus``): int32 ids, and token_bytes (V,) the bytes each id stands for.
    """

    name: str
    train: np.ndarray  # (N_train,) uint8 bytes, or int32 token ids
    val: np.ndarray  # (N_val,)
    token_bytes: np.ndarray | None = None  # (V,) UTF-8 bytes per token id; None: one byte per token

    # What the training loop asks of a corpus; ChatCorpus answers the same with examples.

    def train_batch(self, B: int, T: int, rng: np.random.Generator) -> Batch:
        """B windows of T tokens at random offsets, and their targets (training/batches.py)."""
        return Batch(*get_batch(self.train, B, T, rng))

    def val_bits_per_byte(
        self, model, batch_size: int, max_windows: int | None, progress: bool = False
    ) -> float:
        """The model's bits per byte on ``max_windows`` validation windows spread over the split (all: None)."""
        return bits_per_byte(model, self.val, batch_size, max_windows, progress, self.token_bytes)

    def evaluation_line(self, T: int, max_windows: int | None) -> str:
        """What ``val_bits_per_byte`` is about to score."""
        return evaluation_line("val", self.val, T, max_windows)

    def configured(self, train_on_prompt: bool = False, packing: bool = False) -> Corpus:
        """This corpus: a loss mask and packing are choices for conversations, which a text has not."""
        if train_on_prompt or packing:
            raise CorpusError(
                f"--train-on-prompt and --packing apply to conversations (*.jsonl or {DEVILS_DICTIONARY_CHAT}); "
                f"{self.name!r} is running text"
            )
        return self

    def encoded(self, tokenizer) -> Corpus:
        """This corpus in a subword tokenizer's ids (``tokenize_corpus``)."""
        return tokenize_corpus(self, tokenizer)


def load_corpus(name_or_path: str) -> Corpus:
    """Load a shipped corpus by name, or any UTF-8 text file by path.

    A shipped name reads data/NAME.train.txt.xz and data/NAME.val.txt.xz. A path is read as bytes,
    checked to be non-empty valid UTF-8, and split by `split_text`: validation starts at the first
    byte of the line that holds byte N * 90 // 100, so it is the last ~10% of the text in whole
    lines. The bytes are used as they are (no newline or BOM normalisation). A shipped name wins
    over a file of the same name in the current directory.
    """
    if name_or_path in SHIPPED_CORPORA:
        name = name_or_path
        return Corpus(name, read_shipped(name, "train"), read_shipped(name, "val"))
    if name_or_path == DEVILS_DICTIONARY_CHAT or name_or_path.endswith(".jsonl"):
        return load_chat_corpus(name_or_path)
    path = Path(name_or_path)
    if not path.exists():
        shipped = ", ".join((*SHIPPED_CORPORA, DEVILS_DICTIONARY_CHAT))
        if path.suffix or path.name != name_or_path:  # "x.txt", "dir/x", "./x" name files
            raise CorpusError(f"no such file: {name_or_path!r} (nor a shipped corpus: {shipped})")
        raise CorpusError(
            f"unknown corpus {name_or_path!r}: shipped corpora are {shipped}, "
            "or give the path of a UTF-8 text file (or of conversations, *.jsonl)"
        )
    if not path.is_file():
        raise CorpusError(f"{name_or_path!r} is not a file")
    raw = path.read_bytes()
    if not raw:
        raise CorpusError(f"{name_or_path!r} is empty")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{name_or_path!r} is not valid UTF-8: {err.reason} at byte offset {err.start}"
        ) from err
    train, val = split_text(read_only(raw), name_or_path)
    return Corpus(path.stem, train, val)


def load_chat_corpus(name_or_path: str) -> ChatCorpus:
    """Conversations in the chat format as a corpus (io/chat_data.py): the Devil's Dictionary's, or a file's."""
    if name_or_path == DEVILS_DICTIONARY_CHAT:
        train = chat_data.dictionary_conversations(
            read_shipped("devils_dictionary", "train").tobytes().decode()
        )
        val = chat_data.dictionary_conversations(read_shipped("devils_dictionary", "val").tobytes().decode())
        name = DEVILS_DICTIONARY_CHAT
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise CorpusError(f"no such file of conversations: {name_or_path!r}")
        train, val = chat_data.split_conversations(chat_data.read_conversations(path))
        name = path.stem
    return ChatCorpus(name, train, val)


def corpus_files(name_or_path: str) -> list[Path]:
    """The files ``load_corpus(name_or_path)`` reads: a shipped corpus's two splits, or the path itself."""
    shipped = "devils_dictionary" if name_or_path == DEVILS_DICTIONARY_CHAT else name_or_path
    if shipped in SHIPPED_CORPORA:
        return [shipped_path(shipped, split) for split in ("train", "val")]
    return [Path(name_or_path)]


def shipped_path(name: str, split: str) -> Path:
    """The file of one split of a shipped corpus: data/NAME.SPLIT.txt.xz."""
    return DATA_DIR / f"{name}.{split}.txt.xz"


@functools.cache  # read-only arrays, safe to share: each file is decompressed once per process
def read_shipped(name: str, split: str) -> np.ndarray:
    """Decompress one split of a shipped corpus into a read-only uint8 array."""
    path = shipped_path(name, split)
    if not path.is_file():
        raise CorpusError(
            f"shipped corpus file missing: {path} (reinstall minilora: `pip install .` or "
            "`pip install -e .` from a source checkout; there, `python data/build_corpora.py` rebuilds it)"
        )
    return read_only(lzma.decompress(path.read_bytes()))


def tokenize_corpus(corpus: Corpus, tokenizer) -> Corpus:
    """The corpus in a subword tokenizer's ids (BPETokenizer, io/bpe.py): each split encoded whole.

    The splits stay where load_corpus cut them (at a line start), so no token straddles the two.
    The ids are int32 (SmolLM2's 49,152 do not fit in uint8); token_bytes keeps the bytes per id,
    so that bits per byte still divides by the bytes of the text scored, whatever the tokenizer.
    """

    def encode(split: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokenizer.encode(split.tobytes().decode("utf-8")), dtype=np.int32)
        ids.flags.writeable = False
        return ids

    return Corpus(corpus.name, encode(corpus.train), encode(corpus.val), tokenizer.token_byte_lengths())


def read_only(raw: bytes) -> np.ndarray:
    """View bytes as a uint8 array; bytes are immutable, so the array is read-only."""
    return np.frombuffer(raw, dtype=np.uint8)


def split_text(data: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Split at the start of the line holding byte N * 90 // 100: the last ~10% is validation.

    Cutting at a line start keeps every line whole, and since byte 0x0a (newline) never occurs
    inside a multi-byte UTF-8 character, no character is split either. Validation is at least the
    last 10% of the bytes. Needs a newline before that byte, so a one-line text is too short.
    """
    N = len(data)
    boundary = N * (100 - VAL_PERCENT) // 100  # integer arithmetic: no float rounding at the edge
    newlines = np.flatnonzero(data[:boundary] == ord("\n"))
    if newlines.size == 0:
        raise CorpusError(
            f"{source!r} is too short to split ({N} bytes): it needs a line break before byte "
            f"{boundary} so that whole lines are left for both training and validation"
        )
    cut = int(newlines[-1]) + 1  # first byte of the line that starts validation
    return data[:cut], data[cut:]
