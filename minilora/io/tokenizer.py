"""Byte-level tokenizer: a token is one byte of the text's UTF-8 encoding.

The simplest tokenizer that can encode any text: the vocabulary is the 256 possible byte values, so
there is no unknown token, no training and no vocabulary file. An ASCII letter is one token, "é"
is two and most emoji are four, so sequences are longer than with a learned subword vocabulary
(BPE, as in GPT-2), which is what this module leaves out. Decoding can meet a byte sequence that is
not valid UTF-8 (a model can sample one, or a slice can cut a character in half); it is shown with
the replacement character U+FFFD instead of failing.
"""

import numpy as np

VOCAB_SIZE = 256  # one token per byte value 0..255


def encode(text: str) -> np.ndarray:
    """Return the UTF-8 bytes of text as token ids, shape (len(text.encode()),), dtype uint8."""
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(ids) -> str:
    """Turn a 1-D sequence of token ids (any integer array or list) back into text.

    Ids must lie in 0..255; the first one outside raises ValueError with its value and position.
    Bytes that do not form valid UTF-8 decode to U+FFFD. Pass NumPy arrays or lists: move device
    arrays to the host first.
    """
    ids = np.asarray(ids)
    if ids.size == 0:
        return ""
    if ids.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of token ids, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    outside = np.flatnonzero((ids < 0) | (ids >= VOCAB_SIZE))
    if outside.size:
        position = int(outside[0])
        raise ValueError(
            f"token id {int(ids[position])} at position {position} is outside the byte "
            f"vocabulary 0..{VOCAB_SIZE - 1}"
        )
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class ByteTokenizer:
    """The byte-level tokenizer as an object with BPETokenizer's interface (io/bpe.py), for code that
    takes either: encode, decode, vocab_size and the bytes each id stands for (one, always)."""

    vocab_size = VOCAB_SIZE
    eos_id = None  # no end-of-sequence token: text ends when the budget does

    def encode(self, text: str) -> np.ndarray:
        return encode(text)

    def decode(self, ids) -> str:
        return decode(ids)

    def token_byte_lengths(self) -> np.ndarray:
        return np.ones(VOCAB_SIZE, dtype=np.int64)  # (V,)
