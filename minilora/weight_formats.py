"""How a weight is held, dense or quantized, and the layer pair that multiplies by it: chosen once.

A model's weight is either an array (dense: trainable, its own gradient formed when it trains) or a
``quant.QuantizedWeight`` (blocks, dequantized a slab at a time: frozen, so a backward gives only
dx). Which one a parameter is gets decided where the weight enters a model, by ``format_of``, and is
recorded in ``model.formats``; every layer that reads the weight asks that record for its pair:

    fmt.linear_forward(ops, x, W, b)                             -> (y, cache)
    fmt.linear_backward(ops, dout, cache, compute_dW, compute_db) -> (dx, dW or None, db or None)
    fmt.embedding_forward(ops, ids, table, dtype)                -> (x, cache or None)
    fmt.transpose(W)                                             -> W^T, held the same way
    fmt.to_dense(W)                                              -> W as an array (a merge needs it)

A cache goes back to the backward of the format that made it (the model keeps the format beside
the cache), so no backward ever tests what kind of cache or weight it was handed. ``ops`` is the
model's layer namespace (layers/ops.py): the dense pair runs through it, so a fast path's linear
layer plugs in there; the quantized pair is ``layers.quantized_linear`` (a fast path swaps the
weight's decoder instead, which the weight carries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .backend import get_xp
from .layers.quantized_linear import (
    quantized_embedding_forward,
    quantized_linear_backward,
    quantized_linear_forward,
)
from .quant.weight import QuantizedWeight


@dataclass(frozen=True)
class WeightFormat:
    """One way of holding a weight, with the layer functions that use a weight held that way."""

    name: str  # "dense" or "quantized"
    trainable: bool  # whether a weight held this way can get a gradient (blocks cannot)
    linear_forward: Callable
    linear_backward: Callable
    embedding_forward: Callable
    transpose: Callable
    to_dense: Callable
    array_module: Callable  # the weight's array module: numpy or cupy


def _dense_linear_backward(ops, dout, cache, compute_dW: bool, compute_db: bool):
    return ops.linear_backward(dout, cache, compute_dW=compute_dW, compute_db=compute_db)


def _quantized_linear_backward(ops, dout, cache, compute_dW: bool, compute_db: bool):
    """dx only: quantized blocks and their bias are frozen, whatever the caller would like."""
    return quantized_linear_backward(dout, cache), None, None


DENSE = WeightFormat(
    name="dense",
    trainable=True,
    linear_forward=lambda ops, x, W, b: ops.linear_forward(x, W, b),
    linear_backward=_dense_linear_backward,
    embedding_forward=lambda ops, ids, table, dtype: ops.embedding_forward(ids, table),
    transpose=lambda W: W.T,
    to_dense=lambda W: W,
    array_module=get_xp,
)

QUANTIZED = WeightFormat(
    name="quantized",
    trainable=False,
    linear_forward=lambda ops, x, W, b: quantized_linear_forward(x, W, b),
    linear_backward=_quantized_linear_backward,
    embedding_forward=lambda ops, ids, table, dtype: (quantized_embedding_forward(ids, table, dtype), None),
    transpose=lambda W: W.transposed(),
    to_dense=lambda W: W.dense(),
    array_module=lambda W: W.xp,
)


def format_of(value) -> WeightFormat:
    """The format of a weight as it enters a model: the one place that asks what a weight is."""
    return QUANTIZED if isinstance(value, QuantizedWeight) else DENSE
