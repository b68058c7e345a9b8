"""Causal flash attention on the GPU: one CUDA kernel forward, two backward, never a (T, T) array.

The math is minilora.layers.flash_attention's (read that module first): the forward walks key tiles
with the online softmax and keeps only the per-row log-sum-exp L (B, H, T); the backward recomputes
the probabilities P = exp(q k^T / sqrt(hs) - L) tile by tile, with D = rowsum(dO * O) computed
first. The CUDA source is ``flash_attention.cu`` beside this file; its opening comment says how the
threads share the work. What differs from the NumPy reference:

- Queries are tiled too: one thread block per 64 queries (forward, dQ) or 64 keys (dK, dV) of one
  head, so a tile of q, k and v fits in shared memory. Tiles above the causal diagonal are never
  visited; only the diagonal tile and the short last tile (T not a multiple of 64) are masked.
- The backward is two kernels. One walks, for a key tile, every query tile that sees it and sums
  dK and dV in registers; the other walks, for a query tile, every key tile it sees and sums dQ.
  The second recomputes the scores once more rather than adding into dQ with atomics: the result
  is the same bits on every run.
- Two precisions, both on the tensor cores with float32 accumulators and the softmax, L and D in
  float32. bfloat16 arrays: mma.sync 16 x 8 x 16 products, P and dS rounded to bf16 before they
  meet the next product. float32 arrays: "3xTF32", each operand split into two tf32 numbers
  (10-bit mantissas) and multiplied as three products, which keeps float32's accuracy (the fourth,
  dropped product is below 2^-22 of the result; the kernels meet the float32 tests' tolerances).
  The kernels keep scores and accumulators in registers and load the next tile of the streamed
  side while they work on the current one (two shared stages, cp.async).
- Dropout takes the reference's mask: a (B, H, T, T) float32 array holding 0 or 1 / (1 - p), which
  multiplies P before it meets V, exactly as ``att * dropout_mask`` does in attention.py. The mask
  is read tile by tile, never written.

Layout: the kernels address q, k, v (and dq, dk, dv) by strides, so they read the per-head views of
the fused (B, T, 3C) qkv and write the (B, T, 3C) gradient without copies; o and do share a second
set of strides, the (B, T, C) layout of merge_heads. Every launch allocates from CuPy's pool and
never syncs with the host, so a training step that uses them can be captured in a CUDA graph.
Head sizes: multiples of 16 up to 128.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ....layers.attention import split_heads
from .blocks import compile_options, head_strides

BLOCK = 64  # queries and keys per tile; the CUDA source's BM and BN
HEAD_SIZES = tuple(range(16, 129, 16))  # head sizes the kernels are instantiated for
_SOURCE_PATH = Path(__file__).with_name("flash_attention.cu")
THREADS = 128  # four warps, each 16 rows of a 64-row tile


class FlashAttentionCache(NamedTuple):
    q: object  # (B, H, T, hs) queries, unscaled (views of qkv in the model)
    k: object  # (B, H, T, hs) keys
    v: object  # (B, H, T, hs) values
    out: object  # (B, H, T, hs) the output O (a view of y in the model)
    lse: object  # (B, H, T) float32 log-sum-exp of each row's visible scores
    dropout_mask: object  # (B, H, T, T) float32 or None


def family(dtype) -> str:
    """'f32' for float32 arrays, 'bf16' for bfloat16 (or uint16 holding bf16 bit patterns)."""
    name = getattr(dtype, "name", str(dtype))
    if name == "float32":
        return "f32"
    if name in ("bfloat16", "uint16"):
        return "bf16"
    raise TypeError(f"flash attention takes float32 or bfloat16 arrays, got {name}")


def supports(head_size: int, dtype) -> bool:
    """Whether the kernels cover this head size and dtype (otherwise use the cuBLAS attention)."""
    name = getattr(dtype, "name", str(dtype))
    return head_size in HEAD_SIZES and name in ("float32", "bfloat16", "uint16")


def _shared_bytes(kind: str, fam: str, hs: int) -> int:
    """Dynamic shared memory of one block, as the kernel carves it (see flash_attention.cu)."""
    item = 4 if fam == "f32" else 2
    tile = item * BLOCK * (hs + 16 // item)  # bytes of one (64, hs) tile, rows padded by 16 bytes
    return {
        "forward": 5 * tile,  # q, and two stages of (k, v)
        "dkdv": 6 * tile + 2 * 2 * 4 * BLOCK,  # k, v, and two stages of (q, dO, L, D)
        "dq": 6 * tile,  # q, dO, and two stages of (k, v)
    }[kind]


_NAMES = {"forward": "flash_forward", "dkdv": "flash_backward_dkdv", "dq": "flash_backward_dq"}


_ROW_DOT = {"f32": "flash_row_dot<float>", "bf16": "flash_row_dot<__nv_bfloat16>"}


@functools.cache
def _module(fam: str, hs: int):
    """The CUDA source compiled for one family and head size (four kernels); cached on disk by CuPy."""
    import cupy

    names = [f"{_NAMES[kind]}_{fam}<{hs}>" for kind in _NAMES] + [_ROW_DOT[fam]]
    return cupy.RawModule(code=_SOURCE_PATH.read_text(), options=compile_options(), name_expressions=names)


@functools.cache
def _kernel(kind: str, fam: str, hs: int):
    """One instantiated kernel, allowed the dynamic shared memory it needs (over the 48 KiB default)."""
    if kind == "row_dot":
        return _module(fam, hs).get_function(_ROW_DOT[fam])
    kernel = _module(fam, hs).get_function(f"{_NAMES[kind]}_{fam}<{hs}>")
    kernel.max_dynamic_shared_size_bytes = _shared_bytes(kind, fam, hs)
    return kernel


def _aligned(x) -> bool:
    """Whether the kernels' 16-byte loads may read x in place: base and every row on 16 bytes."""
    item = x.dtype.itemsize
    return x.data.ptr % 16 == 0 and all(s % 16 == 0 for s in x.strides[:3]) and x.strides[3] == item


def _mask(dropout_mask, shape):
    """The dropout mask as the kernels read it: (B, H, T, T) float32, contiguous; 0 (null) for none."""
    import cupy

    if dropout_mask is None:
        return None, 0
    B, H, T, _ = shape
    if dropout_mask.shape != (B, H, T, T):
        raise ValueError(f"dropout_mask must have shape {(B, H, T, T)}, got {dropout_mask.shape}")
    mask = cupy.ascontiguousarray(dropout_mask, dtype=cupy.float32)
    return mask, mask


def check_inputs(q, k, v) -> None:
    """Raise ValueError unless q, k, v share one (B, H, T, hs) shape and dtype the kernels cover."""
    if not (q.shape == k.shape == v.shape and q.ndim == 4):
        raise ValueError(f"q, k, v must share one (B, H, T, hs) shape; got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    family(q.dtype)
    if q.shape[-1] not in HEAD_SIZES:
        raise ValueError(f"flash attention takes head sizes {HEAD_SIZES}, got {q.shape[-1]}")


def flash_forward(q, k, v, out, dropout_mask=None):
    """Causal attention into ``out``.   q, k, v, out: (B, H, T, hs) views -> lse (B, H, T) float32.

    q, k and v must share strides (as the views of one qkv do); out may have its own.
    """
    import cupy

    check_inputs(q, k, v)
    B, H, T, hs = q.shape
    fam = family(q.dtype)
    lse = cupy.empty((B, H, T), dtype=cupy.float32)
    mask, mask_arg = _mask(dropout_mask, q.shape)
    grid = (math.ceil(T / BLOCK), B * H)
    args = (
        q,
        k,
        v,
        out,
        lse,
        mask_arg,
        np.int32(H),
        np.int32(T),
        *head_strides(q, "q"),
        *head_strides(out, "out"),
    )
    kernel = _kernel("forward", fam, hs)
    kernel(
        grid,
        (THREADS,),
        (*args, np.float32(1.0 / math.sqrt(hs))),
        shared_mem=_shared_bytes("forward", fam, hs),
    )
    del mask  # kept alive until the launch is queued
    return lse


def flash_backward(dout, q, k, v, out, lse, dq, dk, dv, dropout_mask=None) -> None:
    """Gradients of ``flash_forward`` into dq, dk, dv (views with q's strides); dout shares out's strides."""
    import cupy

    B, H, T, hs = q.shape
    fam = family(q.dtype)
    mask, mask_arg = _mask(dropout_mask, q.shape)
    dsum = cupy.empty((B, H, T), dtype=cupy.float32)  # D = rowsum(dO * O)
    o_strides = head_strides(out, "out")
    if head_strides(dout, "dout") != o_strides:
        raise ValueError("dout must have the strides of out")
    row_dot = _kernel("row_dot", fam, hs)
    row_dot(
        (math.ceil(H * T / 8), B),
        (256,),
        (dout, out, dsum, np.int32(H), np.int32(T), np.int32(hs), *o_strides),
    )
    scale = np.float32(1.0 / math.sqrt(hs))
    common = (q, k, v, dout, lse, dsum, mask_arg)
    sizes = (np.int32(H), np.int32(T), *head_strides(q, "q"), *o_strides, scale)
    grid = (math.ceil(T / BLOCK), B * H)
    threads = (THREADS,)
    dkdv = _kernel("dkdv", fam, hs)
    dkdv(grid, threads, (*common, dk, dv, *sizes), shared_mem=_shared_bytes("dkdv", fam, hs))
    dq_kernel = _kernel("dq", fam, hs)
    dq_kernel(grid, threads, (*common, dq, *sizes), shared_mem=_shared_bytes("dq", fam, hs))
    del mask


def flash_attention(q, k, v, dropout_mask=None):
    """softmax(q k^T / sqrt(hs) + causal) (dropout) v.   q, k, v: (B, H, T, hs) -> (out, lse (B, H, T)).

    out has q's dtype; lse is float32. Inputs that are not C-contiguous are copied first.
    """
    import cupy

    q, k, v = (cupy.ascontiguousarray(x) for x in (q, k, v))
    out = cupy.empty(q.shape, dtype=q.dtype)
    return out, flash_forward(q, k, v, out, dropout_mask)


def flash_attention_backward(dout, q, k, v, out, lse, dropout_mask=None):
    """dout: (B, H, T, hs) -> dq, dk, dv (B, H, T, hs), for the q, k, v, out, lse of ``flash_attention``."""
    import cupy

    q, k, v, out, dout = (cupy.ascontiguousarray(x) for x in (q, k, v, out, dout))  # one set of strides
    dq, dk, dv = (cupy.empty(q.shape, dtype=q.dtype) for _ in range(3))
    flash_backward(dout, q, k, v, out, lse, dq, dk, dv, dropout_mask)
    return dq, dk, dv


def attention_forward(qkv, n_head: int, dropout_mask=None):
    """Causal self-attention of GPT-2's fused projection.   qkv: (B, T, 3C) -> (y (B, T, C), cache).

    Reads q, k, v in place from qkv and writes y in merge_heads' layout directly.
    """
    import cupy

    q, k, v = split_heads(qkv, n_head)  # views, each (B, H, T, hs)
    if not _aligned(q):
        qkv = cupy.ascontiguousarray(qkv)
        q, k, v = split_heads(qkv, n_head)
    B, H, T, hs = q.shape
    y = cupy.empty((B, T, H * hs), dtype=qkv.dtype)
    out = y.reshape(B, T, H, hs).transpose(0, 2, 1, 3)  # (B, H, T, hs) view of y
    lse = flash_forward(q, k, v, out, dropout_mask)
    return y, FlashAttentionCache(q=q, k=k, v=v, out=out, lse=lse, dropout_mask=dropout_mask)


def attention_backward(dout, cache: FlashAttentionCache):
    """dout: (B, T, C) -> dqkv: (B, T, 3C), written in the layout split_heads took apart."""
    import cupy

    B, H, T, hs = cache.q.shape
    dout = cupy.ascontiguousarray(dout)
    dy = dout.reshape(B, T, H, hs).transpose(0, 2, 1, 3)  # (B, H, T, hs), the strides of cache.out
    dqkv = cupy.empty((B, T, 3 * H * hs), dtype=dout.dtype)
    dq, dk, dv = split_heads(dqkv, H)  # views with the strides of q, k, v
    flash_backward(dy, cache.q, cache.k, cache.v, cache.out, cache.lse, dq, dk, dv, cache.dropout_mask)
    return dqkv
