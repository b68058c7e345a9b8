"""Grouped-query attention on the GPU (Llama's attention), by one of two routes.

- **Flash** (float32 and bf16 with a head size the flash kernel covers, flash_attention.py): each
  key/value head is repeated for the G query heads of its group (Hugging Face's ``repeat_kv``; two
  (B, H, T, hs) copies, small beside the (B, H, T, T) scores that then never exist) and the flash
  kernels run over H heads. The backward sums the G copies' dk and dv back into one head in one
  kernel (``group_sum``), the backward of the repetition.
- **cuBLAS** (float64, other head sizes, or ``attention.USE_FLASH`` off): batched products with the
  G query heads of a group stacked as rows (``layers.gqa_attention.group_heads``), and the mask, the
  softmax and its backward done in place on the (B, H, T, T) scores by attention_softmax's row
  kernels. It returns the reference's cache, and its backward takes the reference forward's cache too.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ....backend import matmul
from ....layers.attention import example_bias
from ....layers.gqa_attention import GQAAttentionCache, check_heads, group_heads, ungroup_heads
from . import attention, flash_attention
from .attention_softmax import causal_softmax, causal_softmax_backward
from .blocks import KernelModule, head_strides, launch_elementwise

_SOURCE = r"""
// The G copies of each key/value head summed back into one: src (B, H_kv, G, T, hs) contiguous ->
// dst[b, j, t, :] at dst's own (batch, head, time) strides (any layout with a contiguous head axis).
template <typename Elem>
__global__ void group_sum(const Elem* src, Elem* dst, int G, int H_kv, int T, int hs,
                          long long db, long long dh, long long dt, long long n) {
    typedef typename Compute<Elem>::type Real;
    FOR_EACH_ELEMENT(i, n) {  // i over (B, H_kv, T, hs)
        const int d = i % hs;
        const long long rest = i / hs;
        const int t = rest % T, j = (rest / T) % H_kv;
        const long long b = rest / ((long long)T * H_kv), plane = (long long)T * hs;
        const Elem* s = src + (b * H_kv + j) * G * plane + (long long)t * hs + d;
        Real total = 0;
        for (int g = 0; g < G; ++g) total += Real(s[g * plane]);
        dst[b * db + j * dh + t * dt + d] = Elem(total);
    }
}
"""
_KERNELS = KernelModule(_SOURCE, ("group_sum",), dtypes=("float32", "float64", "bfloat16"))


class GQAFlashCache(NamedTuple):
    flash: flash_attention.FlashAttentionCache  # over the repeated (B, H, T, hs) keys and values
    n_kv_head: int  # H_kv: how many heads dk and dv are summed back into


def _uses_flash(q) -> bool:
    return attention.USE_FLASH and flash_attention.supports(q.shape[-1], q.dtype)


def _repeat_kv(x, G: int):
    """(B, H_kv, T, hs) -> (B, H_kv * G, T, hs), contiguous: head j repeated for query heads jG .. jG + G - 1."""
    import cupy

    B, H_kv, T, hs = x.shape
    if G == 1:
        return cupy.ascontiguousarray(x)
    repeated = cupy.broadcast_to(x[:, :, None], (B, H_kv, G, T, hs))  # a view, no copy yet
    return cupy.ascontiguousarray(repeated).reshape(B, H_kv * G, T, hs)


def _sum_groups(dx, H_kv: int):
    """(B, H, T, hs) contiguous -> (B, H_kv, T, hs): each group's G heads summed (the backward of _repeat_kv).

    The result is a (B, H_kv, T, hs) view of a (B, T, H_kv, hs) array, the layout merge_heads joins for free.
    """
    import cupy

    B, H, T, hs = dx.shape
    if H == H_kv:
        return dx
    out = cupy.empty((B, T, H_kv, hs), dtype=dx.dtype).transpose(0, 2, 1, 3)  # (B, H_kv, T, hs) view
    kernel = _KERNELS.get("group_sum", dx.dtype)
    launch_elementwise(kernel, out.size, (dx, out, np.int32(H // H_kv), np.int32(H_kv), np.int32(T),
                                          np.int32(hs), *head_strides(out, "dk"), out.size))  # fmt: skip
    return out


def gqa_attention_forward(q, k, v, dropout_mask=None, example_start=None):
    """Grouped-query causal attention.   q: (B, H, T, hs), k, v: (B, H_kv, T, hs) -> (y, cache).

    y: (B, H, T, hs), on the flash route a view of a (B, T, H, hs) array (merge_heads is then free).
    Packed rows (``example_start`` (B, T), layers/attention.py) take the cuBLAS route, their example
    mask added to the scores.
    """
    import cupy

    H, H_kv = check_heads(q, k, v)
    if _uses_flash(q) and example_start is None:
        B, _, T, hs = q.shape
        q = cupy.ascontiguousarray(q)  # (B, H, T, hs): the strides of the repeated keys and values
        k, v = _repeat_kv(k, H // H_kv), _repeat_kv(v, H // H_kv)  # (B, H, T, hs) each
        out = cupy.empty((B, T, H, hs), dtype=q.dtype).transpose(0, 2, 1, 3)  # (B, H, T, hs) view
        lse = flash_attention.flash_forward(q, k, v, out, dropout_mask)
        flash = flash_attention.FlashAttentionCache(
            q=q, k=k, v=v, out=out, lse=lse, dropout_mask=dropout_mask
        )
        return out, GQAFlashCache(flash=flash, n_kv_head=H_kv)
    scale = 1.0 / math.sqrt(q.shape[-1])
    q = q * scale  # (B, H, T, hs), contiguous
    k, v = cupy.ascontiguousarray(k), cupy.ascontiguousarray(v)
    att = ungroup_heads(matmul(group_heads(q, H_kv), k.swapaxes(-1, -2)), H)  # (B, H, T, T) scores
    if example_start is not None:
        att += example_bias(example_start, q.shape[2], att.dtype)  # (B, 1, T, T), over the heads
    causal_softmax(att)  # scores -> probabilities, in place
    if dropout_mask is not None:
        dropout_mask = cupy.ascontiguousarray(dropout_mask, dtype=att.dtype)
    att_used = att if dropout_mask is None else att * dropout_mask
    y = ungroup_heads(matmul(group_heads(att_used, H_kv), v), H)  # (B, H, T, hs)
    return y, GQAAttentionCache(q=q, k=k, v=v, att=att, dropout_mask=dropout_mask, scale=scale)


def gqa_attention_backward(dout, cache):
    """(dq, dk, dv) of either route; the cuBLAS route does the softmax's backward in place on (B, H, T, T)."""
    import cupy

    if isinstance(cache, GQAFlashCache):
        return _gqa_flash_backward(dout, cache)
    q, k, v, mask = cache.q, cache.k, cache.v, cache.dropout_mask
    H, H_kv = q.shape[1], k.shape[1]
    att = cupy.ascontiguousarray(cache.att)
    mask = None if mask is None else cupy.ascontiguousarray(mask, dtype=att.dtype)
    dy = group_heads(cupy.ascontiguousarray(dout), H_kv)  # (B, H_kv, G*T, hs)
    att_used = att if mask is None else att * mask
    dv_t = matmul(dy.swapaxes(-1, -2), group_heads(att_used, H_kv))  # (B, H_kv, hs, T), summed over the group
    del att_used
    grad = ungroup_heads(matmul(dy, cupy.ascontiguousarray(v).swapaxes(-1, -2)), H)  # (B, H, T, T)
    causal_softmax_backward(att, grad, mask)  # -> ds, in place
    grad = group_heads(grad, H_kv)  # (B, H_kv, G*T, T)
    dq = ungroup_heads(matmul(grad, cupy.ascontiguousarray(k)), H)  # (B, H, T, hs)
    dq *= cache.scale  # through q_scaled = q * scale
    dk_t = matmul(group_heads(cupy.ascontiguousarray(q), H_kv).swapaxes(-1, -2), grad)  # (B, H_kv, hs, T)
    return dq, dk_t.swapaxes(-1, -2), dv_t.swapaxes(-1, -2)


def _gqa_flash_backward(dout, cache: GQAFlashCache):
    """The flash backward over the H repeated heads, then dk and dv summed over each group."""
    import cupy

    f = cache.flash
    # dout in the layout of out, (B, T, H, hs) underneath: free when it is to_heads of a (B, T, C) array
    dy = cupy.ascontiguousarray(dout.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # (B, H, T, hs)
    dq, dk, dv = (cupy.empty(f.q.shape, dtype=f.q.dtype) for _ in range(3))  # q's strides
    flash_attention.flash_backward(dy, f.q, f.k, f.v, f.out, f.lse, dq, dk, dv, f.dropout_mask)
    return dq, _sum_groups(dk, cache.n_kv_head), _sum_groups(dv, cache.n_kv_head)
