"""Validation loss in bits per byte.

A language model's cross-entropy in nats per token, divided by ln 2, is bits per token; with the
byte-level tokenizer a token is a byte, so this is bits per byte, the number of bits an ideal
arithmetic coder driven by the model would spend per byte of text. Uniform guessing over 256 byte
values costs 8 bits; gzip manages roughly 2.5 to 3 on English prose.

With a subword tokenizer (SmolLM2's BPE) a token stands for several bytes, and bits per token would
not compare across tokenizers. The sum of the targets' nats is then divided by the number of bytes
those target tokens spell (``token_bytes``: (V,) bytes per id), which is again the coder's bits per
byte of the text scored, and comparable with the byte-level models' numbers.

The text is cut into non-overlapping windows of block_size inputs (plus the byte after each, as its
last target), so every scored byte is predicted from the bytes before it in its window; the
incomplete window at the end is left out. Conversations are scored as examples instead
(training/examples.py), on the targets the loss scores, the assistant's: a target equal to IGNORE
counts neither nats nor bytes (``bits_per_byte_of``, over any batches).
"""

from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from ..layers import IGNORE
from .examples import Batch


def window_starts(n_tokens: int, block_size: int, max_windows: int | None = None) -> np.ndarray:
    """Offsets of the non-overlapping windows, all of them or ``max_windows`` spread evenly."""
    n_windows = (n_tokens - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"text of {n_tokens} tokens is too short for one window of {block_size} + 1")
    chosen = np.arange(n_windows)
    if max_windows is not None and max_windows < n_windows:
        chosen = np.linspace(0, n_windows - 1, max_windows).round().astype(np.int64)
    return chosen * block_size


def scored_targets(targets: np.ndarray) -> np.ndarray:
    """The targets the loss scores (not IGNORE), flat."""
    return targets[targets != IGNORE]


def bytes_of(targets: np.ndarray, token_bytes: np.ndarray | None = None) -> int:
    """The bytes of text that the scored target ids spell: one each byte-level, token_bytes[id] for subwords."""
    scored = scored_targets(targets)
    return scored.size if token_bytes is None else int(token_bytes[scored].sum())


def loss_in_bits_per_byte(
    mean_nats: float, targets: np.ndarray, token_bytes: np.ndarray | None = None
) -> float:
    """A mean cross-entropy over the scored ``targets`` (nats per token) as bits per byte of the text they spell.

    mean_nats * n_scored is the targets' total in nats; divided by the bytes they spell and by ln 2
    it is what ``bits_per_byte`` reports for a split, here for one batch (the progress bar's figure).
    """
    return mean_nats * scored_targets(targets).size / max(bytes_of(targets, token_bytes), 1) / math.log(2)


def bytes_scored(
    data: np.ndarray, block_size: int, max_windows: int | None = None, token_bytes: np.ndarray | None = None
) -> int:
    """The bytes of text whose prediction ``bits_per_byte`` scores with the same windows: its divisor."""
    starts = window_starts(len(data), block_size, max_windows)
    targets = data[starts[:, None] + 1 + np.arange(block_size)]  # (n_windows, T) ids scored
    return bytes_of(targets, token_bytes)


def evaluation_line(split: str, data: np.ndarray, block_size: int, max_windows: int | None = None) -> str:
    """What an evaluation is about to score, said before it starts: "evaluating val: 8 windows of 256 tokens"."""
    windows = len(window_starts(len(data), block_size, max_windows))
    return f"evaluating {split}: {windows:,} window{'s' if windows != 1 else ''} of {block_size} tokens"


def bits_per_byte(
    model,
    data: np.ndarray,
    batch_size: int = 16,
    max_windows: int | None = None,
    progress: bool = False,
    token_bytes: np.ndarray | None = None,
) -> float:
    """Cross-entropy of ``model`` on ``data`` (1-D token ids) in bits per byte of the scored text.

    token_bytes: (V,) the bytes each token id spells; None for byte-level ids (one byte each).
    """
    T = model.config.block_size
    starts = window_starts(len(data), T, max_windows)
    batches = (window_batch(data, starts[i : i + batch_size], T) for i in range(0, len(starts), batch_size))
    return bits_per_byte_of(model, batches, token_bytes, progress, total=-(-len(starts) // batch_size))


def window_batch(data: np.ndarray, starts: np.ndarray, T: int) -> Batch:
    """The windows of T inputs at ``starts`` (B,) and their targets one token later: a (B, T) batch."""
    positions = starts[:, None] + np.arange(T)  # (B, T) offsets into data
    return Batch(data[positions].astype(np.int64), data[positions + 1].astype(np.int64))


def bits_per_byte_of(
    model, batches, token_bytes=None, progress: bool = False, total: int | None = None
) -> float:
    """Cross-entropy of ``model`` over ``batches`` (training/examples.Batch) in bits per byte of the scored text.

    Each batch's loss is the mean over its scored targets, so it counts times their number; IGNORE
    targets add neither nats nor bytes. ``total``: the number of batches, for the progress bar.
    """
    total_nats, total_bytes = 0.0, 0
    for batch in tqdm(batches, desc="eval", unit="batch", total=total, disable=not progress, leave=False):
        _, loss, _ = model.forward(batch.x, batch.y, positions=batch.positions)
        total_nats += float(loss) * scored_targets(batch.y).size
        total_bytes += bytes_of(batch.y, token_bytes)
    if total_bytes == 0:
        raise ValueError(
            "no target of the evaluated text is scored: the assistant's replies start after the block of "
            f"{model.config.block_size} tokens; give a larger --block-size"
        )
    return total_nats / total_bytes / math.log(2)
