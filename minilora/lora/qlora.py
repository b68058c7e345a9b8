"""QLoRA's layer: plain LoRA beside a frozen weight held quantized (Dettmers et al., 2023).

    y = x deq(W)^T + b + s (drop(x) lora_A^T) lora_B^T

The frozen product comes from ``layers.quantized_linear`` (the weight dequantized a slab at a time,
no weight gradient); the adapter's path is layer.py's ``lora_forward`` / ``lora_backward``,
unchanged. x feeds both paths, so dx is the sum of the two.
"""

from __future__ import annotations

from ..layers.quantized_linear import quantized_linear_backward, quantized_linear_forward
from .layer import LoraLinearCache, lora_backward, lora_forward


def qlora_linear_forward(x, W, b, lora_A, lora_B, scaling: float, dropout_mask=None):
    """y = x deq(W)^T + b + s (drop(x) lora_A^T) lora_B^T.   x: (..., C_in) -> y: (..., C_out)."""
    y, base = quantized_linear_forward(x, W, b)
    delta, lora = lora_forward(x, lora_A, lora_B, scaling, dropout_mask)
    y += delta
    return y, LoraLinearCache(base=base, lora=lora)


def qlora_linear_backward(dout, cache: LoraLinearCache):
    """Returns (dx, dlora_A, dlora_B): the quantized base is frozen, its bias too."""
    dx = quantized_linear_backward(dout, cache.base)
    dx_lora, dlora_A, dlora_B = lora_backward(dout, cache.lora)
    dx += dx_lora
    return dx, dlora_A, dlora_B
