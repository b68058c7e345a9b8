"""Causal attention computed tile by tile, never holding the (B, H, T, T) probabilities (FlashAttention).

Plain attention (attention.py) forms every score s_ij = q_i . k_j / sqrt(hs), keeps the softmax
probabilities P (B, H, T, T) for the backward, and so needs memory quadratic in T. FlashAttention
(Dao, Fu, Ermon, Rudra and Ré, 2022) computes the same output over tiles of ``block`` keys and
values, keeping only O(T) numbers per head between tiles, and recomputes P in the backward.

The forward rests on the online softmax. For one query row, after the tiles seen so far, keep the
running max m, the running denominator l = sum_j exp(s_j - m) and the unnormalised output
acc = sum_j exp(s_j - m) v_j. A new tile, keys j in [start, end), updates them as

    m_new = max(m, max_j s_j)
    l_new = exp(m - m_new) l   + sum_j exp(s_j - m_new)
    acc   = exp(m - m_new) acc + sum_j exp(s_j - m_new) v_j

since exp(m - m_new) moves every earlier term from the old max to the new one. After the last
tile, out = acc / l and L = m + log l is the row's logsumexp: P_ij = exp(s_ij - L_i). The 2022
paper keeps m and l and normalises the output at every tile; keeping L alone and dividing once at
the end is the form of FlashAttention-2 (Dao, 2023). Both give the same output, up to rounding.

The backward, with dO the upstream gradient and P recomputed from q, k and L tile by tile:

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D),   dQ = dS K / sqrt(hs),   dK = dS^T Q / sqrt(hs)

where D_i = sum_j P_ij dP_ij = dO_i . O_i = rowsum(dO * O): the softmax backward's row sum, known
before any tile is visited. Recomputing P costs one more product per tile (q k^T again) and saves
the (B, H, T, T) memory.

Causal masking per tile: key tile [start, end) is seen only by queries from ``start`` on, so each
tile's scores are computed for those queries alone (every tile above the diagonal is skipped), and
only the square diagonal part needs the triangle mask. The loop runs over key/value tiles, T / block
of them; all queries that see a tile are handled at once, vectorised over batch and heads. A GPU
kernel would also split the queries into tiles, one thread block each, to fit on-chip memory; the
arithmetic is the same. This module is the reference for such a kernel: the model does not call it.

Packed rows (attention.py): with ``example_start`` (B, T) every query sees only its own example's
keys, so a tile's scores also get -inf on the keys before each query's example, and a query that has
seen no key yet keeps m = -inf, which the update treats as "nothing seen" (its terms are 0). The
queries that see a key tile at all are those whose example starts before the tile ends: a prefix
of the queries from the tile's start on (example starts only grow along a row), so the tile is
taken for that prefix alone, and a tile no query of any row sees is skipped. That is the saving
packing makes in the kernels, tile by tile.

Shapes: B batch, H heads, T positions, hs head size; a tile holds the n = end - start positions
[start, end), n = block except for a shorter last tile.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_xp, matmul
from .attention import causal_bias, example_bias

DEFAULT_BLOCK = 64  # positions per key/value tile (not GPT's block_size, the context length)


class FlashAttentionCache(NamedTuple):
    q: object  # (B, H, T, hs) queries, as given (the backward scales them again: T hs values)
    k: object  # (B, H, T, hs) keys
    v: object  # (B, H, T, hs) values
    out: object  # (B, H, T, hs) the attention output O
    logsumexp: object  # (B, H, T) L, the log of each row's softmax denominator: P = exp(s - L)
    block: int  # positions per key/value tile
    scale: float  # 1/sqrt(hs)
    example_start: object  # (B, T) for packed rows, or None


def check_inputs(q, k, v, block: int) -> None:
    """Raise ValueError unless q, k, v share one (B, H, T, hs) shape and the tile width is positive."""
    if not (q.shape == k.shape == v.shape and q.ndim == 4):
        raise ValueError(f"q, k, v must share one (B, H, T, hs) shape; got {q.shape}, {k.shape}, {v.shape}")
    if block < 1:
        raise ValueError(f"block must be a positive number of positions, got {block}")


def tile_causal_bias(xp, n_queries: int, n_keys: int, dtype):
    """(n_queries, n_keys) additive mask of a key tile against every query from the tile's start on.

    The first n_keys queries sit at the tile's own positions and see only the keys up to their own:
    causal_bias's triangle. Every later query comes after the whole tile and sees all of it.
    """
    diagonal = causal_bias(xp, n_keys, n_keys, dtype)  # (n_keys, n_keys), -inf above the diagonal
    below = xp.zeros((n_queries - n_keys, n_keys), dtype=dtype)
    return xp.concatenate([diagonal, below])  # (n_queries, n_keys)


def tile_scores(q_scaled, k, start: int, end: int, stop: int, example_start=None):
    """Scores of key tile [start, end) for the queries start..stop-1: (B, H, stop - start, end - start)."""
    xp = get_xp(q_scaled)
    scores = matmul(q_scaled[:, :, start:stop], k[:, :, start:end].swapaxes(-1, -2))  # (B, H, m, n)
    scores += tile_causal_bias(xp, stop - start, end - start, scores.dtype)
    if (
        example_start is not None
    ):  # keys before a query's example: -inf (the keys count from the tile's start)
        scores += example_bias(example_start[:, start:stop] - start, end - start, scores.dtype)
    return scores


def tiles(T: int, block: int, example_start=None):
    """(start, end, stop) of each key/value tile that some query sees: keys [start, end), queries start..stop-1.

    Without packing every query from the tile's start on sees the tile (stop = T); with packing, only
    those whose example starts before ``end`` (in some row), and a tile none sees is left out.
    """
    spans = []
    for start in range(0, T, block):
        end = min(start + block, T)
        stop = T if example_start is None else int((example_start < end).sum(axis=1).max())
        if stop > start:
            spans.append((start, end, stop))
    return spans


def flash_attention(q, k, v, block: int = DEFAULT_BLOCK, example_start=None):
    """softmax(q k^T / sqrt(hs) + causal) v over key/value tiles, with the online softmax.

    q, k, v: (B, H, T, hs); example_start: (B, T) for packed rows, or None. Returns out (B, H, T, hs)
    and L (B, H, T), each row's logsumexp.
    """
    check_inputs(q, k, v, block)
    xp = get_xp(q)
    B, H, T, hs = q.shape
    q_scaled = q * (1.0 / math.sqrt(hs))  # scaling q (T hs values) is cheaper than scaling q k^T
    m = xp.full((B, H, T), -xp.inf, dtype=q.dtype)  # running row max: nothing seen yet
    row_sum = xp.zeros((B, H, T), dtype=q.dtype)  # l, the running denominator sum_j exp(s_j - m)
    acc = xp.zeros((B, H, T, hs), dtype=q.dtype)  # running output, sum_j exp(s_j - m) v_j
    for start, end, stop in tiles(T, block, example_start):
        scores = tile_scores(q_scaled, k, start, end, stop, example_start)  # (B, H, stop - start, n)
        m_old = m[:, :, start:stop]  # (B, H, stop - start)
        m_new = xp.maximum(m_old, scores.max(axis=-1))  # -inf for a query that has seen no key yet
        m_shift = xp.where(m_new == -xp.inf, 0.0, m_new)  # what exp subtracts: 0 where nothing is seen
        rescale = xp.exp(m_old - m_shift)  # moves the earlier terms to the new max (0 before any key)
        p = xp.exp(scores - m_shift[..., None])  # (B, H, stop - start, n), 0 where masked
        row_sum[:, :, start:stop] = rescale * row_sum[:, :, start:stop] + p.sum(axis=-1)
        acc[:, :, start:stop] = rescale[..., None] * acc[:, :, start:stop] + matmul(p, v[:, :, start:end])
        m[:, :, start:stop] = m_new
    out = acc / row_sum[..., None]  # (B, H, T, hs), each row normalised once (every query sees itself)
    return out, m + xp.log(row_sum)  # L = m + log l, (B, H, T)


def flash_attention_forward(q, k, v, block: int = DEFAULT_BLOCK, example_start=None):
    """Causal attention over tiles.   q, k, v: (B, H, T, hs) -> out: (B, H, T, hs).

    The cache keeps q, k, v, out and the logsumexp L (B, H, T): O(T) numbers per head beyond the
    inputs and output, where plain attention keeps the (B, H, T, T) probabilities.
    """
    out, logsumexp = flash_attention(q, k, v, block, example_start)
    cache = FlashAttentionCache(q, k, v, out, logsumexp, block, 1.0 / math.sqrt(q.shape[-1]), example_start)
    return out, cache


def flash_attention_backward(dout, cache: FlashAttentionCache):
    """Gradient of tiled causal attention.   dout: (B, H, T, hs) -> dq, dk, dv, each (B, H, T, hs).

    Per key/value tile, for the queries from its start on, the forward was
      s = q_scaled k^T + causal      ->  recomputed (the one product more than the plain backward)
      P = exp(s - L)                 ->  recomputed from the saved logsumexp, 0 where masked
      out = P v (summed over tiles)  ->  dv = P^T dout,  dP = dout v^T
      P = softmax(s)                 ->  ds = P * (dP - D),  D = rowsum(dout * out)
      s = q_scaled k^T               ->  dq_scaled += ds k,  dk = ds^T q_scaled
      q_scaled = q * scale           ->  dq = dq_scaled * scale
    dk and dv of a tile come from that tile alone; dq sums over every tile a query sees.
    """
    xp = get_xp(dout)
    k, v, L = cache.k, cache.v, cache.logsumexp
    q_scaled = cache.q * cache.scale  # recomputed, as in the forward
    T = q_scaled.shape[2]
    D = (dout * cache.out).sum(axis=-1)  # (B, H, T): sum_j P_ij dP_ij, before any tile
    dq_scaled = xp.zeros_like(q_scaled)  # (B, H, T, hs), summed over tiles
    dk, dv = xp.zeros_like(k), xp.zeros_like(v)  # (B, H, T, hs): a tile no query sees keeps 0
    for start, end, stop in tiles(T, cache.block, cache.example_start):
        scores = tile_scores(q_scaled, k, start, end, stop, cache.example_start)  # (B, H, m, n)
        p = xp.exp(scores - L[:, :, start:stop, None])  # (B, H, m, n), m = stop - start queries
        dout_seen = dout[:, :, start:stop]  # (B, H, m, hs), the queries that see this tile
        dv[:, :, start:end] = matmul(p.swapaxes(-1, -2), dout_seen)  # (B, H, n, hs)
        dp = matmul(dout_seen, v[:, :, start:end].swapaxes(-1, -2))  # (B, H, m, n)
        ds = p * (dp - D[:, :, start:stop, None])  # (B, H, m, n), the softmax's backward
        dq_scaled[:, :, start:stop] += matmul(ds, k[:, :, start:end])  # (B, H, m, hs)
        dk[:, :, start:end] = matmul(ds.swapaxes(-1, -2), q_scaled[:, :, start:stop])  # (B, H, n, hs)
    return dq_scaled * cache.scale, dk, dv
