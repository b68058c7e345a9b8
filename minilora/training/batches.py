"""Training batches: windows of a token stream at random offsets, and their targets one token later.

A language model learns to predict each token from the ones before it, so a batch is B windows of
T tokens and, as targets, the same windows shifted by one. The offsets come from a host generator
(``backend.host_rng``), so a batch is a pure function of the seed and the step.
"""

from __future__ import annotations

import numpy as np


def get_batch(
    data: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample B windows of T tokens at uniform random offsets; targets are inputs shifted by one.

    x[b, t] = data[o_b + t] and y[b, t] = data[o_b + t + 1], with o_b uniform in 0..N-T-1 so that
    the last target stays inside data. Both are int64, shape (B, T). The windows are gathered in
    one fancy-indexing step: offsets[:, None] + arange(T) is a (B, T) array of positions.
    """
    if data.ndim != 1:
        raise ValueError(f"data must be a 1-D array of token ids, got shape {data.shape}")
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    N = len(data)
    if N < block_size + 1:
        raise ValueError(
            f"data has {N} tokens, fewer than block_size + 1 = {block_size + 1} "
            "(a window of inputs plus the token after it)"
        )
    offsets = rng.integers(0, N - block_size, size=batch_size)  # (B,), high is exclusive
    positions = offsets[:, None] + np.arange(block_size)  # (B, T)
    x = data[positions].astype(np.int64)  # (B, T)
    y = data[positions + 1].astype(np.int64)  # (B, T)
    return x, y
