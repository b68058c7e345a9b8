"""LoRA's layer on the GPU in fewer passes: the scale and the adds folded into cuBLAS products.

The reference (``minilora.lora.layer``) forms the update as an array of its own, scales it in one
pass and adds it to the base's output in another, and its backward does the same for dx. Here each
of those is one product that accumulates into the array it meets (cuBLAS's beta = 1, alpha = s):

    forward   y = x W + b              the GPU's linear layer (linear.py)
              h = x_in lora_A^T        (N, r), x_in = x (or x * the dropout mask)
              y += s h lora_B^T        one product into y: no (N, C_out) update, no scale or add pass
    backward  dx = dout W^T            the reference linear layer (and db, when the bias trains)
              dlora_B = s dout^T h     (C_out, r)
              dh = s dout lora_B       (N, r)
              dlora_A = dh^T x_in      (r, C_in)
              dx += dh lora_A          one product into dx

Over a bf16 base (mixed precision) the factors enter the products as bf16 copies (r (C_in + C_out)
numbers, rounded each step, as autocast does), so every product takes bf16 operands and sums in
float32; the adapter's input is never cast to float32, and h and dh are bf16. dlora_A and dlora_B
leave their products in the factors' own dtype (float32), unrounded. For float32 and float64 arrays
these are the reference's terms, with the scale applied inside the products instead of after them
(tests/test_cuda_lora.py: equal to 1e-12 in float64); dtypes this cuBLAS path does not take fall
back to the reference.
"""

from __future__ import annotations

from typing import NamedTuple

from ...layers import LinearCache, linear_backward
from ...lora import layer as reference
from ...lora.layer import LoraCache
from . import blas
from .linear import linear_forward


class FusedLoraCache(NamedTuple):
    base: LinearCache  # the frozen x W + b
    lora: LoraCache  # x_in, h, and the factors as the products used them (in x's dtype)
    factor_dtype: object  # the factors' own dtype: their gradients' dtype


def lora_linear_forward(x, W, b, lora_A, lora_B, scaling: float, dropout_mask=None):
    """y = x W + b + s (drop(x) lora_A^T) lora_B^T.   x: (..., C_in) -> y: (..., C_out), in x's dtype."""
    if x.dtype.name not in blas.CUDA_DATA_TYPES:
        return reference.lora_linear_forward(x, W, b, lora_A, lora_B, scaling, dropout_mask)
    y, base = linear_forward(x, W, b)  # (..., C_out), C-contiguous
    x_in = x if dropout_mask is None else x * dropout_mask
    A, B = lora_A.astype(x.dtype, copy=False), lora_B.astype(x.dtype, copy=False)  # (r, C_in), (C_out, r)
    h = blas.matmul(x_in, A.T)  # (..., r)
    blas.matmul(h, B.T, alpha=scaling, accumulate=y)  # y += s h B^T
    lora = LoraCache(x_in=x_in, h=h, lora_A=A, lora_B=B, scaling=scaling, dropout_mask=dropout_mask)
    return y, FusedLoraCache(base=base, lora=lora, factor_dtype=lora_A.dtype)


def lora_linear_backward(dout, cache, compute_dW: bool = False, compute_db: bool = True):
    """Returns (dx, dW, db, dlora_A, dlora_B) as the reference does; dW is None unless asked for."""
    if not isinstance(cache, FusedLoraCache):  # the forward fell back to the reference
        return reference.lora_linear_backward(dout, cache, compute_dW=compute_dW, compute_db=compute_db)
    dx, dW, db = linear_backward(dout, cache.base, compute_dW=compute_dW, compute_db=compute_db)
    lora = cache.lora
    r, C_in = lora.lora_A.shape
    C_out = lora.lora_B.shape[0]
    dout_rows = dout.reshape(-1, C_out)  # (N, C_out)
    dlora_B = blas.matmul(
        dout_rows.T, lora.h.reshape(-1, r), out_dtype=cache.factor_dtype, alpha=lora.scaling
    )
    dh = blas.matmul(dout, lora.lora_B, alpha=lora.scaling)  # (..., r)
    dlora_A = blas.matmul(dh.reshape(-1, r).T, lora.x_in.reshape(-1, C_in), out_dtype=cache.factor_dtype)
    if lora.dropout_mask is None:
        blas.matmul(dh, lora.lora_A, accumulate=dx)  # dx += dh lora_A
    else:
        dx += blas.matmul(dh, lora.lora_A) * lora.dropout_mask  # the forward was x_in = x * mask
    return dx, dW, db, dlora_A, dlora_B
