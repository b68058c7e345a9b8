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
happen in the model, between the projections and this function. The attention is attention.py's
``scaled_dot_product_attention`` and its backward, unchanged, on folded shapes (``fold_groups``): the
G query heads of group j of sequence b become one (B*H_kv, G, T, hs) entry's heads, and the group's
key and value head a single head, (B*H_kv, 1, T, hs), that the batched matmuls broadcast to all G (no
key or value head is copied). A key/value head fans out to its group's G query heads, so its gradient
is the sum of the G that attention.py's backward returns. The output projection (o_proj) is an
ordinary linear layer outside this function; ``merge_heads`` (attention.py) joins the heads for it.
``group_heads`` is the other layout, the fast paths': a group's G heads stacked as the G*T rows of one
matrix, fewer and larger products with the group's sums inside the matmuls.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp
from .attention import AttentionCache, scaled_dot_product_attention, scaled_dot_product_attention_backward


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


def fold_groups(x, n_kv_head: int):
    """(B, H, T, d) -> (B*H_kv, G, T, d) (a reshape): group j of sequence b at b*H_kv + j, its G heads next.

    Keys and values (H = H_kv) fold to one head, G = 1, which the matmuls broadcast over the G query heads.
    """
    B, H, T, d = x.shape
    return x.reshape(B * n_kv_head, H // n_kv_head, T, d)


def unfold_groups(x, n_kv_head: int):
    """(B*H_kv, G, T, d) -> (B, H_kv*G, T, d), the inverse of fold_groups (a reshape)."""
    BH_kv, G, T, d = x.shape
    return x.reshape(BH_kv // n_kv_head, n_kv_head * G, T, d)


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


def grouped_scaled_dot_product_attention(q, k, v, dropout_mask=None, example_start=None):
    """softmax(q k^T / sqrt(hs) + causal) v, each query head against the key/value head of its group.

    q: (B, H, T_q, hs), the last T_q positions; k, v: (B, H_kv, T_k, hs), every position so far;
    dropout_mask: (B, H, T_q, T_k) or None, already holding the 1 / (1 - p) scaling; example_start:
    (B, T_q) for packed rows (attention.py), or None. Returns (y (B, H, T_q, hs), the scaled q, the
    probabilities att (B, H, T_q, T_k), the scale).
    """
    _, H_kv = check_heads(q, k, v)
    mask = None if dropout_mask is None else fold_groups(dropout_mask, H_kv)
    starts = None if example_start is None else get_xp(q).repeat(example_start, H_kv, axis=0)  # (B*H_kv, T_q)
    y, q, att, scale = scaled_dot_product_attention(*(fold_groups(x, H_kv) for x in (q, k, v)), mask, starts)
    y, q, att = (unfold_groups(x, H_kv) for x in (y, q, att))  # (B, H, T_q, hs) and att (B, H, T_q, T_k)
    return y, q, att, scale


def gqa_attention_forward(q, k, v, dropout_mask=None, example_start=None):
    """Grouped-query causal self-attention.   q: (B, H, T, hs), k, v: (B, H_kv, T, hs) -> y: (B, H, T, hs).

    H and H_kv are read from the shapes. ``dropout_mask`` (B, H, T, T), if given, multiplies the
    attention probabilities; it already holds the 1 / (1 - p) scaling. ``example_start`` (B, T):
    packed rows (attention.py), or None.
    """
    y, q_scaled, att, scale = grouped_scaled_dot_product_attention(q, k, v, dropout_mask, example_start)
    cache = GQAAttentionCache(q=q_scaled, k=k, v=v, att=att, dropout_mask=dropout_mask, scale=scale)
    return y, cache


def gqa_attention_backward(dout, cache: GQAAttentionCache):
    """Gradients of grouped-query attention.   dout: (B, H, T, hs) -> (dq, dk, dv).

    dq: (B, H, T, hs); dk, dv: (B, H_kv, T, hs). attention.py's backward on the folded shapes gives dk
    and dv per query head, (B*H_kv, G, T, hs); a key/value head fans out to the G query heads of its
    group, so its gradient is the sum of the G gradients they send back.
    """
    H_kv = cache.k.shape[1]
    q, k, v, att = (fold_groups(x, H_kv) for x in (cache.q, cache.k, cache.v, cache.att))
    mask = None if cache.dropout_mask is None else fold_groups(cache.dropout_mask, H_kv)
    folded = AttentionCache(q=q, k=k, v=v, att=att, dropout_mask=mask, scale=cache.scale)
    dq, dk, dv = scaled_dot_product_attention_backward(fold_groups(dout, H_kv), folded)
    dk, dv = (dx.sum(axis=1, keepdims=True) for dx in (dk, dv))  # (B*H_kv, 1, T, hs), summed over the group
    return unfold_groups(dq, H_kv), unfold_groups(dk, H_kv), unfold_groups(dv, H_kv)


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
