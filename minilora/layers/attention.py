"""Causal multi-head self-attention over a fused q, k, v projection, batched over heads.

The input is the output of GPT-2's ``c_attn``: one (B, T, 3C) tensor holding q, k and v side by
side. It is viewed as (B, H, T, hs) per head (H heads of size hs = C / H), and every head of every
sequence goes through the same two batched matmuls: no Python loop over batch, heads or positions.

    att = softmax(q k^T / sqrt(hs) + causal)      (B, H, T, T), row t attends to positions <= t
    y   = dropout(att) v                          (B, H, T, hs), then heads are concatenated

The output projection (``c_proj``) is an ordinary linear layer and lives outside this function.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_xp, matmul
from ..fast.cuda.kernels import use_fused


class AttentionCache(NamedTuple):
    q: object  # (B, H, T, hs) queries, already scaled by 1/sqrt(hs)
    k: object  # (B, H, T, hs) keys
    v: object  # (B, H, T, hs) values
    att: object  # (B, H, T, T) attention probabilities, before dropout
    dropout_mask: object  # (B, H, T, T) or None
    scale: float  # 1/sqrt(hs)


def causal_bias(xp, T: int, dtype):
    """(T, T) additive mask: 0 where key position <= query position, -inf above the diagonal."""
    return xp.triu(xp.full((T, T), -xp.inf, dtype=dtype), k=1)


def split_heads(qkv, n_head: int):
    """(B, T, 3C) -> q, k, v, each (B, H, T, hs) (views, no copy)."""
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    qkv = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hs)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(y):
    """(B, H, T, hs) -> (B, T, C): the heads side by side on the channel axis."""
    B, H, T, hs = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def attention_forward(qkv, n_head: int, dropout_mask=None):
    """Causal self-attention.   qkv: (B, T, 3C) -> y: (B, T, C).

    ``dropout_mask`` (B, H, T, T), if given, multiplies the attention probabilities (GPT-2's
    attn_pdrop); it already holds the 1 / (1 - p) scaling.
    """
    if use_fused(qkv):  # on a GPU: fused causal-softmax kernels around the same matmuls
        from ..fast.cuda.kernels.attention import attention_forward as fused_attention_forward

        return fused_attention_forward(qkv, n_head, dropout_mask)
    xp = get_xp(qkv)
    B, T, C3 = qkv.shape
    if C3 % (3 * n_head) != 0:
        raise ValueError(f"qkv width {C3} is not 3 * n_head * head_size with n_head={n_head}")
    q, k, v = split_heads(qkv, n_head)  # each (B, H, T, hs)
    # BEGIN SOLUTION a3: scaled q k^T, causal mask, row softmax, dropout, times v
    scale = 1.0 / math.sqrt(q.shape[-1])
    q = q * scale  # scaling q (T*hs values) is cheaper than scaling q k^T (T*T values)
    att = matmul(q, k.swapaxes(-1, -2))  # (B, H, T, T)
    att += causal_bias(xp, T, att.dtype)
    att -= att.max(axis=-1, keepdims=True)  # softmax is shift-invariant; this avoids overflow
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    att_used = att if dropout_mask is None else att * dropout_mask
    y = matmul(att_used, v)  # (B, H, T, hs)
    # END SOLUTION
    cache = AttentionCache(q=q, k=k, v=v, att=att, dropout_mask=dropout_mask, scale=scale)
    return merge_heads(y), cache  # (B, T, C)


def attention_backward(dout, cache: AttentionCache):
    """Gradient of causal self-attention.   dout: (B, T, C) -> dqkv: (B, T, 3C).

    Going back through the forward, line by line:
      y = att_used v          ->  datt_used = dy v^T,  dv = att_used^T dy
      att_used = att * mask   ->  datt = datt_used * mask
      att = softmax(s)        ->  ds = att * (datt - sum_j(datt * att))   (row-wise)
      s = q_scaled k^T        ->  dq_scaled = ds k,  dk = ds^T q_scaled
      q_scaled = q * scale    ->  dq = dq_scaled * scale
    Masked (future) positions have att = 0, so ds is 0 there and no gradient leaks backwards in time.
    """
    if use_fused(dout) or not isinstance(cache, AttentionCache):  # the fused long-block cache has no att
        from ..fast.cuda.kernels.attention import attention_backward as fused_attention_backward

        return fused_attention_backward(dout, cache)
    xp = get_xp(dout)
    q, k, v, att, mask, scale = cache
    B, H, T, hs = q.shape
    dy = dout.reshape(B, T, H, hs).transpose(0, 2, 1, 3)  # (B, H, T, hs)
    # BEGIN SOLUTION a3: undo y = att v, the mask, the softmax and s = q k^T, in that order
    att_used = att if mask is None else att * mask
    datt = matmul(dy, v.swapaxes(-1, -2))  # (B, H, T, T)
    dv = matmul(att_used.swapaxes(-1, -2), dy)  # (B, H, T, hs)
    if mask is not None:
        datt *= mask
    datt -= xp.einsum("...j,...j->...", datt, att)[..., None]  # in place: ds = att * (datt - sum_j datt * att)
    ds = xp.multiply(datt, att, out=datt)  # (B, H, T, T)
    dq = matmul(ds, k)  # (B, H, T, hs), the gradient of the scaled q
    dq *= scale
    dk = matmul(ds.swapaxes(-1, -2), q)  # (B, H, T, hs)
    # END SOLUTION
    dqkv = xp.empty((B, T, 3, H, hs), dtype=dout.dtype)
    dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)  # (B, T, H, hs)
    dqkv[:, :, 1] = dk.transpose(0, 2, 1, 3)
    dqkv[:, :, 2] = dv.transpose(0, 2, 1, 3)
    return dqkv.reshape(B, T, 3 * H * hs)
