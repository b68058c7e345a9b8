r"""Byte-level BPE, the tokenizer of GPT-2 and SmolLM2, built from a GGUF file's vocabulary and merges.

minilora's own tokenizer (io/tokenizer.py) makes every UTF-8 byte a token. Byte-level BPE starts
from the same 256 bytes and glues frequent neighbours into longer tokens ("Ġt" + "he" -> "Ġthe"),
following a list of merges ranked by how early training learnt them; SmolLM2 has 48,900 merges and
a vocabulary of 49,152 strings. Encoding a text takes four steps:

1. Special tokens (<|im_start|>, <|im_end|>, <|endoftext|>, ...) are cut out of the text first and
   become their ids directly; only the text between them goes through the steps below.
2. Pre-tokenisation splits that text into words with a regular expression, so that no merge
   crosses a word boundary. GPT-2's pattern (WORD_PATTERN) splits off English contractions ('s,
   're, ...), letters with at most one leading space ( ?\p{L}+), numbers ( ?\p{N}+), runs of other
   symbols, and whitespace, leaving a space before a word to that word. SmolLM2 (tokenizer.ggml.pre
   "smollm", as StarCoder) first cuts out every digit on its own, so 2024 is four words.
3. Each word's UTF-8 bytes become printable characters by GPT-2's byte-to-unicode table (the space
   byte is "Ġ", the newline "Ċ"), so that every token of the vocabulary is an ordinary string.
4. BPE: start from the single characters and repeatedly merge the adjacent pair whose merge has
   the lowest rank, until no adjacent pair has a merge. Each resulting string is a token.

Decoding is the reverse: each id's bytes (the inverse table undoes step 3), concatenated and
decoded as UTF-8; a byte sequence that is not valid UTF-8 (an id sequence cut inside a character)
shows as U+FFFD. Words repeat, so step 4 is cached per word: that cache is what makes plain Python
fast enough, and it grows with the number of distinct words seen.

What this leaves out: training merges, BPE dropout, normalisation (SmolLM2 has none), offsets.
"""

import functools
import math
import operator
import os
from collections.abc import Iterable, Sequence

import numpy as np
import regex  # the `regex` package: Python's `re` has no \p{L} (letter) or \p{N} (number) classes

# GPT-2's pre-tokenizer (openai/gpt-2 encoder.py); the same pattern is llama.cpp's for "gpt2" and "smollm".
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# One number character: a digit, but also ½ or Ⅻ. The group makes regex.split keep each as a piece.
DIGIT_PATTERN = r"(\p{N})"

# tokenizer.ggml.pre -> whether digits are split off one by one before WORD_PATTERN runs.
PRE_TOKENIZERS = {"gpt2": False, "smollm": True}

# tokenizer.ggml.token_type values (GGUF spec) of the tokens that are matched as text in step 1.
CONTROL, USER_DEFINED = 3, 4


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from the 256 byte values to 256 printable characters.

    The 188 bytes that are printable, non-space Latin-1 characters ("!".."~", "¡".."¬", "®".."ÿ")
    stand for themselves; the other 68 (control codes, space, 127..160, the soft hyphen 173) are
    sent in order to chr(256), chr(257), ...: the space (byte 32, the 33rd of them) is chr(288) "Ġ".
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


@functools.cache
def unicode_to_byte() -> dict[str, int]:
    """The inverse of bytes_to_unicode: printable character -> byte value."""
    return {char: byte for byte, char in bytes_to_unicode().items()}


def unicode_to_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for, character by character through unicode_to_byte."""
    char_to_byte = unicode_to_byte()
    outside = [char for char in token if char not in char_to_byte]
    if outside:
        raise ValueError(f"token {token!r} has {outside[0]!r}, a character outside GPT-2's byte table")
    return bytes(char_to_byte[char] for char in token)


class BPETokenizer:
    """A byte-level BPE tokenizer: encode(text) -> list of ids, decode(ids) -> text.

    Built from the vocabulary (tokens[id] is the token's string), the ranked merges ("Ġ t" merges
    "Ġ" and "t"; a lower index merges first), each token's GGUF type, and the pre-tokenizer's name.
    Tokens of type CONTROL or USER_DEFINED are special: found in the text, each is its own id.
    bos_id, eos_id and pad_id are kept for the caller: encode never adds them (SmolLM2's
    tokenizer.ggml.add_bos_token is false).
    """

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int],
        pre: str,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ):
        if len(token_types) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(token_types)} token types")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unknown pre-tokenizer {pre!r}: supported are {sorted(PRE_TOKENIZERS)}")
        self.tokens = list(tokens)  # (V,) id -> token string
        self.ids = {token: i for i, token in enumerate(self.tokens)}  # token string -> id
        self.ranks = {}  # (left, right) -> rank: the order in which merges apply
        for rank, merge in enumerate(merges):
            pair = tuple(merge.split(" "))
            if len(pair) != 2 or not all(part in self.ids for part in (*pair, "".join(pair))):
                raise ValueError(f"merge {rank} ({merge!r}) is not two vocabulary tokens whose join is one")
            self.ranks[pair] = rank
        # token string -> id, for the tokens that encode matches in the text before pre-tokenising
        self.special = {
            token: i for i, token in enumerate(self.tokens) if token_types[i] in (CONTROL, USER_DEFINED)
        }
        self.pre = pre
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.byte_to_char = [bytes_to_unicode()[byte] for byte in range(256)]  # (256,) byte -> printable char
        # Each id's bytes, what decode concatenates: special tokens are their own text, the others go
        # back through the byte table.
        self.token_bytes = [
            token.encode("utf-8") if token in self.special else unicode_to_bytes(token)
            for token in self.tokens
        ]
        # Longest first, so that a special token that begins another is not matched in its place.
        by_length = sorted(self.special, key=len, reverse=True)
        self.special_pattern = regex.compile("|".join(map(regex.escape, by_length))) if by_length else None
        self.word_pattern = regex.compile(WORD_PATTERN)
        self.digit_pattern = regex.compile(DIGIT_PATTERN) if PRE_TOKENIZERS[pre] else None
        self.cache: dict[str, list[int]] = {}  # word -> its ids, filled by encode

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> "BPETokenizer":
        """The tokenizer a GGUF file describes (tokenizer.ggml.* keys; see gguf_file.read_gguf_metadata)."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
        return cls(
            tokens=metadata["tokenizer.ggml.tokens"],
            merges=metadata["tokenizer.ggml.merges"],
            token_types=metadata["tokenizer.ggml.token_type"],
            pre=metadata.get("tokenizer.ggml.pre", "gpt2"),
            bos_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
            pad_id=metadata.get("tokenizer.ggml.padding_token_id"),
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Read a GGUF file's metadata and build its tokenizer (needs the gguf package)."""
        from minilora.io.gguf_file import read_gguf_metadata  # lazy: encoding itself does not need gguf

        return cls.from_gguf_metadata(read_gguf_metadata(path))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_byte_lengths(self) -> np.ndarray:
        """(V,) the number of UTF-8 bytes each id stands for: what bits per byte divides by."""
        return np.array([len(b) for b in self.token_bytes], dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in the text become their single ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if self.special_pattern is None:
            return self.encode_ordinary(text)
        ids, start = [], 0
        for match in self.special_pattern.finditer(text):
            ids += self.encode_ordinary(text[start : match.start()])
            ids.append(self.special[match.group()])
            start = match.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of text with no special tokens recognised: steps 2 to 4 of the module docstring."""
        ids = []
        for word in self.pre_tokenize(text):
            word_ids = self.cache.get(word)
            if word_ids is None:
                word_ids = self.cache[word] = self.bpe(word)
            ids += word_ids
        return ids

    def pre_tokenize(self, text: str) -> list[str]:
        """Split text into the words BPE runs on (step 2): digits alone if the pre-tokenizer says so."""
        if self.digit_pattern is None:
            return self.word_pattern.findall(text)
        words = []
        # split with a group alternates [text, digit, text, digit, ..., text]: odd pieces are digits.
        for n, piece in enumerate(self.digit_pattern.split(text)):
            words += [piece] if n % 2 else self.word_pattern.findall(piece)
        return words

    def bpe(self, word: str) -> list[int]:
        """Merge one word's byte characters by rank (steps 3 and 4) and return the tokens' ids."""
        symbols = [self.byte_to_char[byte] for byte in word.encode("utf-8")]  # one character per byte
        while len(symbols) > 1:
            pairs = list(zip(symbols, symbols[1:]))  # (len - 1,) adjacent pairs
            best = min(pairs, key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break  # no adjacent pair has a merge: the word is done
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of best, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [self.ids[symbol] for symbol in symbols]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of token ids (a list, or a 1-D integer array on the host)."""
        V = len(self.tokens)
        chunks = []
        for position, token_id in enumerate(ids):
            token_id = operator.index(token_id)  # any integer (NumPy's too); a float raises TypeError
            if not 0 <= token_id < V:
                raise ValueError(
                    f"token id {token_id} at position {position} is outside the vocabulary 0..{V - 1}"
                )
            chunks.append(self.token_bytes[token_id])
        return b"".join(chunks).decode("utf-8", errors="replace")
