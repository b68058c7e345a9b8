"""The LoRA variants as small objects: how one adapted linear layer runs forward, backward and merges.

The adapter model (model.py) does not know the math of any variant. For each adapted module it
hands the variant the frozen weight W (C_in, C_out), the bias b (or None), the adapter's own
tensors of that module in a dict keyed by suffix, the scaling s and the dropout mask, and gets
back what it needs:

    forward(x, W, b, tensors, scaling, dropout_mask, ops, base)  -> (y, cache, backward)
    backward(dout, cache, compute_db, ops)                        -> (dx, {suffix: gradient})
    merge(W, tensors, scaling, base)                              -> (W', what unmerge needs)
    unmerge(W', tensors, scaling, undo)                           -> W

``base`` is the format the frozen W is held in (weight_formats.py: dense, or quantized blocks for
QLoRA), which the model recorded when the weight entered it. The forward picks its layer pair by it
once and returns, with its cache, the backward that inverts it: the model keeps that backward
beside the cache, so no backward asks what kind of weight or cache it has.

A suffix names a tensor next to the weight, as PEFT does: ``...c_attn.lora_A`` has the suffix
"lora_A"; a bias gradient comes back under "bias". The math stays in the layer functions of
layer.py, dora.py and qlora.py, which a variant calls through the ``ops`` namespace it is handed
(ops.py: the reference's by default, a fast path's when one is plugged in); the variants only wire
them. ``variant_for(lora_config)`` picks one:

    LoraVariant   y = x W + b + s (drop(x) lora_A^T) lora_B^T            plain LoRA, and PiSSA
    DoraVariant   y = (m / n) (x W + s (drop(x) lora_A^T) lora_B^T) + b  DoRA

PiSSA differs from plain LoRA only in where its tensors start, which is init.py's business, as is
the making of every adapter's tensors.
"""

from __future__ import annotations

from ..weight_formats import DENSE, QUANTIZED, WeightFormat
from .config import LoraConfig
from .dora import dora_merged_weight
from .layer import lora_delta_weight, merge_weight, require_finite
from .ops import REFERENCE_LORA_OPS, LoraOps

FACTORS = ("lora_A", "lora_B")
MAGNITUDE = "lora_magnitude_vector"  # PEFT's name for DoRA's m


def _with_bias(grads: dict, db) -> dict:
    """The gradients, plus the bias's under "bias" when one was computed."""
    if db is not None:
        grads["bias"] = db
    return grads


class LoraVariant:
    """Plain LoRA (layer.py): a frozen W plus s lora_A^T lora_B^T."""

    name = "lora"  # as written in adapter files
    suffixes = FACTORS  # the adapter's tensors per module

    def forward(
        self,
        x,
        W,
        b,
        tensors: dict,
        scaling: float,
        dropout_mask=None,
        ops: LoraOps = REFERENCE_LORA_OPS,
        base: WeightFormat = DENSE,
    ):
        """y = x W + b + s (drop(x) lora_A^T) lora_B^T.   x: (..., C_in) -> y: (..., C_out).

        With W held quantized this is QLoRA (qlora.py): the same adapter beside the dequantized product.
        Returns (y, cache, the backward that takes the cache).
        """
        if base is QUANTIZED:
            y, cache = ops.qlora_linear_forward(
                x, W, b, tensors["lora_A"], tensors["lora_B"], scaling, dropout_mask
            )
            return y, cache, self.qlora_backward
        y, cache = ops.lora_linear_forward(
            x, W, b, tensors["lora_A"], tensors["lora_B"], scaling, dropout_mask
        )
        return y, cache, self.backward

    def backward(self, dout, cache, compute_db: bool = True, ops: LoraOps = REFERENCE_LORA_OPS):
        """dx and {"lora_A": dlora_A, "lora_B": dlora_B, "bias": db}; W is frozen, so dW is never formed."""
        dx, _, db, dlora_A, dlora_B = ops.lora_linear_backward(dout, cache, compute_db=compute_db)  # dW: None
        return dx, _with_bias({"lora_A": dlora_A, "lora_B": dlora_B}, db)

    def qlora_backward(self, dout, cache, compute_db: bool = True, ops: LoraOps = REFERENCE_LORA_OPS):
        """QLoRA's dx and {"lora_A", "lora_B"}: the quantized base's bias is frozen with its blocks."""
        dx, dlora_A, dlora_B = ops.qlora_linear_backward(dout, cache)
        return dx, {"lora_A": dlora_A, "lora_B": dlora_B}

    def merge(self, W, tensors: dict, scaling: float, base: WeightFormat = DENSE):
        """W' = W + s lora_A^T lora_B^T (a new array, checked finite); unmerge needs nothing more.

        A quantized W is dequantized first: the merged weight is dense (float32).
        """
        return merge_weight(base.to_dense(W), tensors["lora_A"], tensors["lora_B"], scaling), None

    def unmerge(self, merged, tensors: dict, scaling: float, undo=None):
        """W = W' - s lora_A^T lora_B^T, within rounding."""
        delta = lora_delta_weight(tensors["lora_A"], tensors["lora_B"], scaling)  # the adapter's precision
        return (merged - delta).astype(merged.dtype, copy=False)

    def is_noop(self, tensors: dict) -> bool:
        """True while the update cannot change the output: lora_B is all zeros."""
        return not bool(tensors["lora_B"].any())


class DoraVariant:
    """DoRA (dora.py): the LoRA-updated direction, rescaled per output unit by a trainable magnitude m."""

    name = "dora"
    suffixes = (*FACTORS, MAGNITUDE)

    def __init__(self, exact_norm_gradient: bool = False):
        self.exact_norm_gradient = exact_norm_gradient  # differentiate through n = ||V|| (the paper does not)

    def forward(
        self,
        x,
        W,
        b,
        tensors: dict,
        scaling: float,
        dropout_mask=None,
        ops: LoraOps = REFERENCE_LORA_OPS,
        base: WeightFormat = DENSE,
    ):
        """y = (m / n) (x W + s (drop(x) lora_A^T) lora_B^T) + b.   x: (..., C_in) -> y: (..., C_out).

        Returns (y, cache, the backward that takes the cache).
        """
        if base is not DENSE:
            raise ValueError(
                "DoRA on a quantized base is not supported (it needs W's column norms): use plain LoRA"
            )
        y, cache = ops.dora_linear_forward(
            x,
            W,
            b,
            tensors["lora_A"],
            tensors["lora_B"],
            tensors[MAGNITUDE],
            scaling,
            dropout_mask,
            exact_norm_gradient=self.exact_norm_gradient,
        )
        return y, cache, self.backward

    def backward(self, dout, cache, compute_db: bool = True, ops: LoraOps = REFERENCE_LORA_OPS):
        """dx and {"lora_A", "lora_B", "lora_magnitude_vector", "bias"}: their gradients; W gets none."""
        dx, db, dlora_A, dlora_B, dm = ops.dora_linear_backward(dout, cache, compute_db=compute_db)
        return dx, _with_bias({"lora_A": dlora_A, "lora_B": dlora_B, MAGNITUDE: dm}, db)

    def merge(self, W, tensors: dict, scaling: float, base: WeightFormat = DENSE):
        """W' = (m / n) (W + s lora_A^T lora_B^T) (checked finite), and n, which unmerge needs."""
        merged, weight_norm = dora_merged_weight(
            base.to_dense(W), tensors["lora_A"], tensors["lora_B"], tensors[MAGNITUDE], scaling
        )
        return require_finite(merged), weight_norm

    def unmerge(self, merged, tensors: dict, scaling: float, undo=None):
        """W = W' n / m - s lora_A^T lora_B^T, within rounding; ``undo`` is the n that merge returned."""
        W = merged * (undo / tensors[MAGNITUDE])  # in the adapter's precision
        W -= lora_delta_weight(tensors["lora_A"], tensors["lora_B"], scaling)
        return W.astype(merged.dtype, copy=False)

    def is_noop(self, tensors: dict) -> bool:
        """Never: this test cannot tell when the magnitudes and the direction's change cancel."""
        return False


def variant_for(lora_config: LoraConfig) -> LoraVariant | DoraVariant:
    """The variant a config asks for: DoRA with ``use_dora``, else plain LoRA (PiSSA included)."""
    if lora_config.use_dora:
        return DoraVariant(exact_norm_gradient=lora_config.dora_exact_gradient)
    return LoraVariant()
