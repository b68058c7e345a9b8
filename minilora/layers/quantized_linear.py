"""A linear layer and a table lookup whose frozen weight is held quantized (QLoRA's base layer).

The weight is a ``minilora.quant.QuantizedWeight``: stored rows of blocks, one row per output
feature, dequantized a slab of rows at a time. The layer computes what ``linear_forward`` computes
with the dequantized matrix, without ever holding all of it in float32:

    y[..., r0:r1] = x deq(W)[r0:r1]^T           for each slab of stored rows r0..r1
    dx = sum over slabs of dout[..., r0:r1] deq(W)[r0:r1]

Dequantization is a fixed function of the stored blocks: the layer's gradient with respect to x is
the dense layer's with deq(W) as its weight, and there is no weight gradient at all, since the
blocks are frozen (QLoRA trains only the adapter beside them). The backward dequantizes again
instead of keeping the float32 slabs: memory is what quantization buys, and dequantizing is cheap
next to the product. Shapes: x (..., C_in); the stored weight (C_out, C_in); y (..., C_out).
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp, matmul


class QuantizedLinearCache(NamedTuple):
    weight: object  # the QuantizedWeight; x is not kept: it would only serve a weight gradient
    bias: object  # (C_out,) or None, frozen as well
    x_dtype: object


def quantized_linear_forward(x, weight, b=None):
    """y = x deq(W)^T + b, a slab of the weight's rows at a time.   x: (..., C_in) -> (..., C_out)."""
    xp = get_xp(x)
    y = xp.empty(x.shape[:-1] + (weight.rows,), dtype=x.dtype)
    for r0, r1 in weight.slabs():
        y[..., r0:r1] = matmul(x, weight.dequantize(r0, r1).astype(x.dtype).T)  # (..., r1 - r0)
    if b is not None:
        y += b
    return y, QuantizedLinearCache(weight=weight, bias=b, x_dtype=x.dtype)


def quantized_linear_backward(dout, cache: QuantizedLinearCache):
    """dx = dout deq(W), slab by slab.   dout: (..., C_out) -> dx: (..., C_in). No weight gradient."""
    weight = cache.weight
    dx = None
    for r0, r1 in weight.slabs():
        part = matmul(dout[..., r0:r1], weight.dequantize(r0, r1).astype(cache.x_dtype))  # (..., C_in)
        if dx is None:
            dx = part
        else:
            dx += part
    return dx


def quantized_embedding_forward(ids, table, dtype):
    """The table's rows at ``ids``, dequantized, in ``dtype``: (B, T) ids -> (B, T, C). Frozen: no backward."""
    return table.take_rows(ids).astype(dtype, copy=False)
