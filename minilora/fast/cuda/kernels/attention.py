"""Causal self-attention on the GPU: cuBLAS batched matmuls around the fused softmax row kernels.

The math is minilora.layers.attention's, line for line; the differences are where the work goes.

- The causal mask and the row softmax are one kernel in place on the (B, H, T, T) scores, and the
  softmax backward (with the dropout mask) another (see attention_softmax). The scale goes on q
  before the product, as in the reference: T * hs multiplications per head rather than T * T.
- Operand layouts. CuPy's batched matmul gives cuBLAS C-contiguous operands and copies any other
  view first. So only the small (T, hs) operands are ever transposed: the backward forms
  dv^T = dy^T att and dk^T = q^T ds, not att^T dy and ds^T q, which would copy two (B, H, T, T)
  arrays. q is scaled into a new array (B, T, C values, the copy cuBLAS needed anyway); k and v are
  made contiguous once in the forward, and dy once in the backward, since minilora's cuBLAS calls
  (cuda_blas) read a transposed stack of matrices in place but copy any view whose batch axes cannot
  be merged into one stride, as the per-head views of qkv and dout are.
- Two variants. Below LSE_MIN_T the forward keeps the probabilities. From LSE_MIN_T on it keeps
  only each row's log-sum-exp, (B, H, T) numbers instead of (B, H, T, T): for T = 1024 and 12 heads
  that is 48 MiB less per sequence and layer. The backward then recomputes the scores q k^T (one
  extra matmul) and the probabilities exp(s - lse) (one elementwise pass). Both keep one cache type,
  ``CudaAttentionCache``, with either ``att`` or ``lse`` set.
- The flash kernel (flash_attention) replaces all of the above for float32 and bf16 with head sizes
  that are multiples of 16 up to 128, dropout included: no (B, H, T, T) array at all. float64 and
  other head sizes keep the cuBLAS path, as does ``USE_FLASH = False`` (its parity run is recorded
  in docs/gpu.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ....backend import matmul
from ....layers.attention import example_bias, merge_heads, split_heads
from . import flash_attention
from .attention_softmax import causal_probs_from_lse, causal_softmax, causal_softmax_backward
from .blocks import compute_dtype

# From this block length on, the forward keeps the log-sum-exp, not the probabilities. Measured on an
# H200 at gpt2s (B 8, T 1024, 12 layers): keeping the probabilities, 116.5 ms a step and 11.0 GB;
# recomputing them, 125.1 ms and 6.6 GB. Below 2048 the memory is affordable and the time is not.
LSE_MIN_T = 2048
USE_FLASH = True  # float32 or bf16 with a head size the flash kernel covers goes through it


class CudaAttentionCache(NamedTuple):
    q: object  # (B, H, T, hs) queries, already scaled by 1/sqrt(hs)
    k: object  # (B, H, T, hs) keys, contiguous
    v: object  # (B, H, T, hs) values, contiguous
    att: object  # (B, H, T, T) probabilities, below LSE_MIN_T; else None
    lse: object  # (B, H, T) log sum_j exp(q_i . k_j) over the visible keys j <= i, from LSE_MIN_T on; else None
    dropout_mask: object  # (B, H, T, T) or None
    scale: float  # 1/sqrt(hs)


def attention_forward(qkv, n_head: int, dropout_mask=None, example_start=None):
    """Causal self-attention.   qkv: (B, T, 3C) -> (y (B, T, C), CudaAttentionCache or FlashAttentionCache).

    Packed rows (``example_start`` (B, T), layers/attention.py) take the cuBLAS route, their example
    mask added to the scores, and keep the probabilities (the log-sum-exp route would lose the mask).
    """
    import cupy

    flash = USE_FLASH and flash_attention.supports(qkv.shape[-1] // (3 * n_head), qkv.dtype)
    if flash and example_start is None:
        return flash_attention.attention_forward(qkv, n_head, dropout_mask)

    T = qkv.shape[1]
    q, k, v = split_heads(qkv, n_head)  # views, each (B, H, T, hs)
    scale = 1.0 / math.sqrt(q.shape[-1])
    real = compute_dtype(q.dtype)  # the scale is applied in float32 even to bf16 queries
    q = (q.astype(real, copy=False) * scale).astype(q.dtype, copy=False)  # (B, H, T, hs), contiguous
    # k and v contiguous once, here: every later product (two now, up to four in the backward) then
    # hands cuBLAS a plain or transposed stack of matrices instead of copying a strided view again.
    k, v = cupy.ascontiguousarray(k), cupy.ascontiguousarray(v)
    att = matmul(q, k.swapaxes(-1, -2))  # (B, H, T, T) scores
    if example_start is not None:
        att += example_bias(example_start, T, att.dtype)  # (B, 1, T, T): -inf before each query's example
    long = T >= LSE_MIN_T and example_start is None
    lse = cupy.empty(att.shape[:-1], dtype=compute_dtype(att.dtype)) if long else None  # (B, H, T)
    causal_softmax(att, lse)  # scores -> probabilities, in place
    if dropout_mask is not None:
        dropout_mask = cupy.ascontiguousarray(dropout_mask, dtype=att.dtype)
    y = matmul(att if dropout_mask is None else att * dropout_mask, v)  # (B, H, T, hs)
    cache = CudaAttentionCache(
        q=q, k=k, v=v, att=att if lse is None else None, lse=lse, dropout_mask=dropout_mask, scale=scale
    )
    return merge_heads(y), cache  # (B, T, C)


def attention_backward(dout, cache: CudaAttentionCache):
    """dout: (B, T, C) -> dqkv: (B, T, 3C), with the probabilities kept or recomputed from the log-sum-exp."""
    if isinstance(cache, flash_attention.FlashAttentionCache):
        return flash_attention.attention_backward(dout, cache)
    att = cache.att
    if att is None:
        att = matmul(cache.q, cache.k.swapaxes(-1, -2))  # the forward's scores again: the extra matmul
        causal_probs_from_lse(att, cache.lse)
    return _backward_from_probs(dout, cache.q, cache.k, cache.v, att, cache.dropout_mask, cache.scale)


def _backward_from_probs(dout, q, k, v, att, mask, scale: float):
    """The reference backward's steps (see minilora.layers.attention), with (T, T) operands kept contiguous."""
    import cupy

    B, H, T, hs = q.shape
    att = cupy.ascontiguousarray(att)
    mask = None if mask is None else cupy.ascontiguousarray(mask, dtype=att.dtype)
    dy = cupy.ascontiguousarray(dout.reshape(B, T, H, hs).transpose(0, 2, 1, 3))  # (B, H, T, hs), used twice
    att_used = att if mask is None else att * mask
    dv_t = matmul(dy.swapaxes(-1, -2), att_used)  # (B, H, hs, T) = (att_used^T dy)^T
    del att_used
    grad = matmul(dy, v.swapaxes(-1, -2))  # (B, H, T, T): d loss / d att_used
    causal_softmax_backward(att, grad, mask)  # -> ds, d loss / d scores, in place
    dq = matmul(grad, k)  # (B, H, T, hs), the gradient of the scaled q
    dk_t = matmul(q.swapaxes(-1, -2), grad)  # (B, H, hs, T) = (ds^T q)^T
    dqkv = cupy.empty((B, T, 3, H, hs), dtype=dout.dtype)
    dq = dq.astype(compute_dtype(dq.dtype), copy=False)  # the scale in float32, as in the forward
    cupy.multiply(dq.transpose(0, 2, 1, 3), scale, out=dqkv[:, :, 0])  # through q_scaled = q * scale
    dqkv[:, :, 1] = dk_t.transpose(0, 3, 1, 2)  # (B, H, hs, T) -> (B, T, H, hs)
    dqkv[:, :, 2] = dv_t.transpose(0, 3, 1, 2)
    return dqkv.reshape(B, T, 3 * H * hs)
