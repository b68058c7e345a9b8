"""Causal multi-head self-attention over a fused q, k, v projection, batched over heads.

The input is the output of GPT-2's ``c_attn``: one (B, T, 3C) tensor holding q, k and v side by
side. It is viewed as (B, H, T, hs) per head (H heads of size hs = C / H), and every head of every
sequence goes through the same two batched matmuls: no Python loop over batch, heads or positions.

    att = softmax(q k^T / sqrt(hs) + causal)      (B, H, T, T), row t attends to positions <= t
    y   = dropout(att) v                          (B, H, T, hs), then heads are concatenated

A row may pack several examples one after another (training/examples.py). Then every token attends
only within its own example: with ``example_start`` (B, T), the position in the row where each
query's example begins, the scores also get -inf on every key before it (``example_bias``), and
causal plus example masks make the block-diagonal causal mask

    query i sees key j  <=>  example_start[i] <= j <= i

so that a packed row computes what its examples would compute each in a row of its own.

The output projection (``c_proj``) is an ordinary linear layer and lives outside this function.
For generation, ``cached_attention_forward`` runs the same attention for a few new positions
against the keys and values of every earlier one, kept in a key/value cache (see generate.py).
``scaled_dot_product_attention`` and its backward hold the masked softmax and its backward for
every attention of the package: grouped-query attention (gqa_attention.py) calls them too.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_xp, matmul


class AttentionCache(NamedTuple):
    q: object  # (B, H, T, hs) queries, already scaled by 1/sqrt(hs)
    k: object  # (B, H, T, hs) keys
    v: object  # (B, H, T, hs) values
    att: object  # (B, H, T, T) attention probabilities, before dropout
    dropout_mask: object  # (B, H, T, T) or None
    scale: float  # 1/sqrt(hs)


def causal_bias(xp, T_q: int, T_k: int, dtype):
    """(T_q, T_k) additive mask for queries at the last T_q of T_k positions: -inf on every later key.

    Query i sits at position T_k - T_q + i and may attend to keys 0..T_k - T_q + i. In training
    T_q = T_k and this is the upper triangle above the diagonal; in generation T_q is the few new
    positions (cached_attention_forward), where a triangle read off the diagonal alone masks keys the
    queries may see.
    """
    # BEGIN SOLUTION a3: -inf where key j comes after query i's position T_k - T_q + i, 0 elsewhere
    return xp.triu(xp.full((T_q, T_k), -xp.inf, dtype=dtype), k=T_k - T_q + 1)  # (T_q, T_k)
    # END SOLUTION


def example_bias(example_start, T_k: int, dtype):
    """(B, 1, T_q, T_k) additive mask of packed rows: -inf on every key before the query's example starts.

    example_start: (B, T_q) integer, the row position where each query's example begins (0 for a
    row of one sequence). Broadcasts over the heads.
    """
    xp = get_xp(example_start)
    before = xp.arange(T_k)[None, None, :] < example_start[:, :, None]  # (B, T_q, T_k)
    return xp.where(before, -xp.inf, 0.0).astype(dtype)[:, None]  # (B, 1, T_q, T_k)


def split_heads(qkv, n_head: int):
    """(B, T, 3C) -> q, k, v, each (B, H, T, hs) (views, no copy)."""
    B, T, C3 = qkv.shape
    if C3 % (3 * n_head) != 0:
        raise ValueError(f"qkv width {C3} is not 3 * n_head * head_size with n_head={n_head}")
    hs = C3 // (3 * n_head)
    qkv = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hs)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(y):
    """(B, H, T, hs) -> (B, T, C): the heads side by side on the channel axis."""
    B, H, T, hs = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def scaled_dot_product_attention(q, k, v, dropout_mask=None, example_start=None):
    """softmax(q k^T / sqrt(hs) + causal [+ example]) v, batched over (B, H).

    q: (B, H, T_q, hs), the last T_q positions; k, v: (B, H, T_k, hs), every position so far, or
    (B, 1, T_k, hs), one key/value head that the matmuls broadcast to all H query heads (that is how
    gqa_attention.py reuses this function). example_start: (B, T_q) for packed rows, or None.
    Returns (y (B, H, T_q, hs), the scaled q, the probabilities att (B, H, T_q, T_k), the scale).
    """
    xp = get_xp(q)
    # BEGIN SOLUTION a3: scaled q k^T and the causal mask
    scale = 1.0 / math.sqrt(q.shape[-1])
    q = q * scale  # scaling q (T hs values) is cheaper than scaling q k^T (T^2 values)
    scores = matmul(q, k.swapaxes(-1, -2))  # (B, H, T_q, T_k)
    scores = scores + causal_bias(xp, q.shape[2], k.shape[2], scores.dtype)  # no attending to later keys
    # END SOLUTION
    if example_start is not None:  # packed rows: no attending to an earlier example's keys either
        scores = scores + example_bias(example_start, k.shape[2], scores.dtype)
    # BEGIN SOLUTION a3: row softmax, dropout, times v
    att = xp.exp(scores - scores.max(axis=-1, keepdims=True))  # softmax is shift-invariant: no overflow
    att = att / att.sum(axis=-1, keepdims=True)  # (B, H, T_q, T_k), rows sum to 1
    att_used = att if dropout_mask is None else att * dropout_mask
    y = matmul(att_used, v)  # (B, H, T_q, hs)
    # END SOLUTION
    return y, q, att, scale


def attention_forward(qkv, n_head: int, dropout_mask=None, example_start=None):
    """Causal self-attention.   qkv: (B, T, 3C) -> y: (B, T, C).

    ``dropout_mask`` (B, H, T, T), if given, multiplies the attention probabilities (GPT-2's
    attn_pdrop); it already holds the 1 / (1 - p) scaling. ``example_start`` (B, T): packed rows
    (see the module), or None.
    """
    q, k, v = split_heads(qkv, n_head)  # each (B, H, T, hs)
    y, q_scaled, att, scale = scaled_dot_product_attention(q, k, v, dropout_mask, example_start)
    cache = AttentionCache(q=q_scaled, k=k, v=v, att=att, dropout_mask=dropout_mask, scale=scale)
    return merge_heads(y), cache  # (B, T, C)


def scaled_dot_product_attention_backward(dy, cache: AttentionCache):
    """Gradients of scaled_dot_product_attention.   dy: (B, H, T_q, hs) -> (dq, dk, dv).

    dq: (B, H, T_q, hs); dk, dv: (B, H, T_k, hs), one per query head even where k and v were one
    broadcast head: that head's gradient is then their sum over the H heads (gqa_attention.py sums).

    Derivation (a3):
        The forward, line by line:
          y = att_used v          ->  datt_used = dy v^T,  dv = att_used^T dy
          att_used = att * mask   ->  datt = datt_used * mask
          att = softmax(s)        ->  ds = att * (datt - sum_j(datt * att))   (row-wise)
          s = q_scaled k^T        ->  dq_scaled = ds k,  dk = ds^T q_scaled
          q_scaled = q * scale    ->  dq = dq_scaled * scale
        Masked (future) positions have att = 0, so ds is 0 there and no gradient leaks backwards in time.
    """
    q, k, v, att, mask = cache.q, cache.k, cache.v, cache.att, cache.dropout_mask
    # BEGIN SOLUTION a3: undo y = att v, the mask, the softmax and s = q k^T, in that order
    att_used = att if mask is None else att * mask
    datt_used = matmul(dy, v.swapaxes(-1, -2))  # (B, H, T, T)
    dv = matmul(att_used.swapaxes(-1, -2), dy)  # (B, H, T, hs)
    datt = datt_used if mask is None else datt_used * mask
    ds = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B, H, T, T), the softmax's backward
    dq = matmul(ds, k) * cache.scale  # (B, H, T, hs), through q_scaled = q * scale
    dk = matmul(ds.swapaxes(-1, -2), q)  # (B, H, T, hs)
    # END SOLUTION
    return dq, dk, dv


def attention_backward(dout, cache: AttentionCache):
    """Gradient of causal self-attention.   dout: (B, T, C) -> dqkv: (B, T, 3C)."""
    xp = get_xp(dout)
    B, H, T, hs = cache.q.shape
    dy = dout.reshape(B, T, H, hs).transpose(0, 2, 1, 3)  # (B, H, T, hs), the layout merge_heads joined
    dq, dk, dv = scaled_dot_product_attention_backward(dy, cache)  # (B, H, T, hs) each
    dqkv = xp.stack([dq, dk, dv])  # (3, B, H, T, hs), the layout split_heads took apart
    return dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * hs)


def cached_attention_forward(qkv, n_head: int, keys, values, start: int):
    """Attention of t new positions over themselves and the ``start`` positions before them (generation).

    qkv: (B, t, 3C) of the new positions; keys, values: (B, H, T_max, hs) buffers whose first
    ``start`` positions hold the earlier keys and values. The new keys and values are written in at
    start..start+t-1, then the new queries attend over all start + t. Inference only: no cache is
    kept for a backward. Returns y: (B, t, C).
    """
    q, k, v = split_heads(qkv, n_head)  # (B, H, t, hs) each
    end = start + q.shape[2]
    keys[:, :, start:end] = k
    values[:, :, start:end] = v
    y, _, _, _ = scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end])
    return merge_heads(y)  # (B, t, C)
