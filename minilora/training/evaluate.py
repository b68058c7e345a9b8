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
incomplete window at the end is left out.
"""

from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm


def window_starts(n_tokens: int, block_size: int, max_windows: int | None = None) -> np.ndarray:
    """Offsets of the non-overlapping windows, all of them or ``max_windows`` spread evenly."""
    n_windows = (n_tokens - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"text of {n_tokens} tokens is too short for one window of {block_size} + 1")
    chosen = np.arange(n_windows)
    if max_windows is not None and max_windows < n_windows:
        chosen = np.linspace(0, n_windows - 1, max_windows).round().astype(np.int64)
    return chosen * block_size


def bytes_of(targets: np.ndarray, token_bytes: np.ndarray | None = None) -> int:
    """The bytes of text that target ids spell: one each for byte-level ids, token_bytes[id] for subwords."""
    return targets.size if token_bytes is None else int(token_bytes[targets].sum())


def loss_in_bits_per_byte(
    mean_nats: float, targets: np.ndarray, token_bytes: np.ndarray | None = None
) -> float:
    """A mean cross-entropy over ``targets`` (nats per token) as bits per byte of the text they spell.

    mean_nats * n_targets is the targets' total in nats; divided by the bytes they spell and by ln 2
    it is what ``bits_per_byte`` reports for a split, here for one batch (the progress bar's figure).
    """
    return mean_nats * targets.size / bytes_of(targets, token_bytes) / math.log(2)


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
    total_nats, total_bytes = 0.0, 0
    batches = range(0, len(starts), batch_size)
    for i in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
        positions = starts[i : i + batch_size, None] + np.arange(T)  # (B, T)
        x = data[positions].astype(np.int64)
        y = data[positions + 1].astype(np.int64)
        _, loss, _ = model.forward(x, y)
        total_nats += float(loss) * y.size  # the loss is a mean over the batch's B*T targets
        total_bytes += bytes_of(y, token_bytes)
    return total_nats / total_bytes / math.log(2)
