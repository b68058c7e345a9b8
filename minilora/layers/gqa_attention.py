"""Grouped-query causal attention (GQA, Llama's attention): fewer key/value heads than query heads.

Llama projects the input separately to q (B, T, H*hs), k and v (B, T, H_kv*hs), with H query heads,
H_kv key/value heads, H divisible by H_kv, and hs the head size. The H query heads fall into H_kv
groups of G = H / H_kv consecutive heads, and every head of group j attends with the one key/value
head j: query head h reads kv head h // G (Hugging Face's ``repeat_kv`` and PyTorch's ``enable_gqa``
order). H_kv = H is ordinary multi-head attention, H_kv = 1 multi-query attention. SmolLM2-135M has
H = 9, H_kv = 3: the key/value cache is a third of the multi-head one.

    att = softmax(q k_j^T / sqrt(hs) + causal)     (B, H, T, T), k_j the key head of q's group
    y   = dropout(att) v_j                         (B, H, T, hs)

The inputs are already split into heads (``to_heads``) and q and k already rotated (rope.py): both
happen in the model, between the projections and this function. No key or value head is copied:
the G query heads of a group are stacked as G*T rows of one matrix, (B, H_kv, G*T, hs), which a
single batched matmul multiplies with the group's (B, H_kv, hs, T) keys. In the backward the same
stacking makes dk and dv sums over the group's G query heads. The output projection (o_proj) is an
ordinary linear layer outside this function; ``merge_heads`` (attention.py) joins the heads for it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_xp, matmul
from .attention import causal_bias


class GQAAttentionCache(NamedTuple):
    q: object  # (B, H, T, hs) queries, already scaled by 1/sqrt(hs)
    k: object  # (B, H_kv, T, hs) keys, one head per group
    v: object  # (B, H_kv, T, hs) values, one head per group
    att: object  # (B, H, T, T) attention probabilities, before dropout
    dropout_mask: object  # (B, H, T, T) or None
    scale: float  # 1/sqrt(hs)


def to_heads(x, n_head: int):
    """(B, T, n_head*hs) -> (B, n_head, T, hs) (a view): one projection's output split into heads.

    For q with n_head = H, for k and v with n_head = H_kv. Its inverse, and its backward, is
    ``attention.merge_heads``; the backward of ``merge_heads`` is ``to_heads``.
    """
    B, T, C = x.shape
    if C % n_head != 0:
        raise ValueError(f"width {C} is not n_head * head_size with n_head={n_head}")
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)  # (B, n_head, T, hs)


def group_heads(x, n_kv_head: int):
    """(B, H, T, d) -> (B, H_kv, G*T, d): the G heads of each group stacked along the rows (a reshape).

    Head h = j*G + g is group j's g-th head, so rows g*T .. g*T + T - 1 of group j are its T positions.
    """
    B, H, T, d = x.shape
    return x.reshape(B, n_kv_head, (H // n_kv_head) * T, d)


def ungroup_heads(x, n_head: int):
    """(B, H_kv, G*T, d) -> (B, H, T, d), the inverse of group_heads (a reshape)."""
    B, H_kv, GT, d = x.shape
    return x.reshape(B, n_head, GT * H_kv // n_head, d)


def check_heads(q, k, v):
    """H, H_kv from the shapes, after checking that they fit together; raises ValueError."""
    H, H_kv = q.shape[1], k.shape[1]
    if k.shape != v.shape:
        raise ValueError(f"keys {k.shape} and values {v.shape} differ in shape")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"queries {q.shape} and keys {k.shape} differ in batch or head size")
    if H % H_kv != 0:
        raise ValueError(f"{H} query heads do not split into groups of the {H_kv} key/value heads")
    return H, H_kv


def grouped_scaled_dot_product_attention(q, k, v, dropout_mask=None):
    """softmax(q k^T / sqrt(hs) + causal) v, each query head against the key/value head of its group.

    q: (B, H, T_q, hs), the last T_q positions; k, v: (B, H_kv, T_k, hs), every position so far;
    dropout_mask: (B, H, T_q, T_k) or None, already holding the 1 / (1 - p) scaling. Returns
    (y (B, H, T_q, hs), the scaled q, the probabilities att (B, H, T_q, T_k), the scale).
    """
    xp = get_xp(q)
    H, H_kv = check_heads(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    q = q * scale  # scaling q (T hs values) is cheaper than scaling q k^T (T^2 values)
    scores = matmul(
        group_heads(q, H_kv), k.swapaxes(-1, -2)
    )  # (B, H_kv, G*T_q, T_k), a group's heads share k
    scores = ungroup_heads(scores, H)  # (B, H, T_q, T_k), one score matrix per query head
    scores = scores + causal_bias(xp, q.shape[2], k.shape[2], scores.dtype)  # no attending to later keys
    att = xp.exp(scores - scores.max(axis=-1, keepdims=True))  # softmax is shift-invariant: no overflow
    att = att / att.sum(axis=-1, keepdims=True)  # (B, H, T_q, T_k), rows sum to 1
    att_used = att if dropout_mask is None else att * dropout_mask
    y = matmul(group_heads(att_used, H_kv), v)  # (B, H_kv, G*T_q, hs), a group's heads share v
    return ungroup_heads(y, H), q, att, scale  # y: (B, H, T_q, hs)


def gqa_attention_forward(q, k, v, dropout_mask=None):
    """Grouped-query causal self-attention.   q: (B, H, T, hs), k, v: (B, H_kv, T, hs) -> y: (B, H, T, hs).

    H and H_kv are read from the shapes. ``dropout_mask`` (B, H, T, T), if given, multiplies the
    attention probabilities; it already holds the 1 / (1 - p) scaling.
    """
    y, q_scaled, att, scale = grouped_scaled_dot_product_attention(q, k, v, dropout_mask)
    cache = GQAAttentionCache(q=q_scaled, k=k, v=v, att=att, dropout_mask=dropout_mask, scale=scale)
    return y, cache


def gqa_attention_backward(dout, cache: GQAAttentionCache):
    """Gradients of grouped-query attention.   dout: (B, H, T, hs) -> (dq, dk, dv).

    dq: (B, H, T, hs); dk, dv: (B, H_kv, T, hs). The forward, line by line, as in attention.py:
      y = att_used v          ->  datt_used = dy v^T,  dv = att_used^T dy
      att_used = att * mask   ->  datt = datt_used * mask
      att = softmax(s)        ->  ds = att * (datt - sum_j(datt * att))   (row-wise)
      s = q_scaled k^T        ->  dq_scaled = ds k,  dk = ds^T q_scaled
      q_scaled = q * scale    ->  dq = dq_scaled * scale
    A key/value head fans out to the G query heads of its group, so its gradient is the sum of the G
    gradients they send back. With the G heads stacked as rows, dv = [att_1; ...; att_G]^T [dy_1;
    ...; dy_G] = sum_g att_g^T dy_g: the matmul's contraction over G*T rows does that sum (dk alike).
    """
    q, k, v, att, mask = cache.q, cache.k, cache.v, cache.att, cache.dropout_mask
    H, H_kv = q.shape[1], k.shape[1]
    dy = group_heads(dout, H_kv)  # (B, H_kv, G*T, hs)
    att_used = att if mask is None else att * mask
    datt_used = ungroup_heads(matmul(dy, v.swapaxes(-1, -2)), H)  # (B, H, T, T)
    dv = matmul(group_heads(att_used, H_kv).swapaxes(-1, -2), dy)  # (B, H_kv, T, hs), summed over the group
    datt = datt_used if mask is None else datt_used * mask
    ds = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B, H, T, T), the softmax's backward
    ds = group_heads(ds, H_kv)  # (B, H_kv, G*T, T)
    dq = ungroup_heads(matmul(ds, k), H) * cache.scale  # (B, H, T, hs), through q_scaled = q * scale
    dk = matmul(ds.swapaxes(-1, -2), group_heads(q, H_kv))  # (B, H_kv, T, hs), summed over the group
    return dq, dk, dv


def cached_gqa_attention_forward(q, k, v, keys, values, start: int):
    """Grouped-query attention of t new positions over themselves and the ``start`` before them (generation).

    q: (B, H, t, hs), k, v: (B, H_kv, t, hs) of the new positions, q and k already rotated for
    positions start..start+t-1; keys, values: (B, H_kv, T_max, hs) buffers whose first ``start``
    positions hold the earlier (rotated) keys and values. The new keys and values are written in at
    start..start+t-1, then the new queries attend over all start + t. The cache holds H_kv heads,
    not H: that is GQA's saving. Inference only: no cache is kept for a backward. Returns y: (B, H, t, hs).
    """
    end = start + q.shape[2]
    keys[:, :, start:end] = k
    values[:, :, start:end] = v
    y, _, _, _ = grouped_scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end])
    return y  # (B, H, t, hs)
