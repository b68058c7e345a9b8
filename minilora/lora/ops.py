"""The seam between an adapted model and its adapter layer functions: a namespace of forward/backward pairs.

The same design as ``minilora.layers.ops`` one level up. The variants (variants.py) never call the
layer functions of layer.py, dora.py and qlora.py by name: they call the pairs of the ``LoraOps`` they
are handed, and the model hands them its ``lora_ops``, by default ``REFERENCE_LORA_OPS``, the readable
functions of this package. A fast path (``minilora.fast``) builds its own ``LoraOps`` with some pairs
swapped for specialised ones and sets ``model.lora_ops`` from above; nothing here knows that it exists.

A forward's cache goes back to the backward of the namespace that made it: the model keeps the
namespace in each adapted layer's cache (model.AdaptedLinearCache), as ``ModelCache.ops`` does for
the base layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .dora import dora_linear_backward, dora_linear_forward
from .layer import lora_linear_backward, lora_linear_forward
from .qlora import qlora_linear_backward, qlora_linear_forward


@dataclass(frozen=True)
class LoraOps:
    """Every adapter layer function a variant calls, by name; see the module docstring."""

    name: str  # what the namespace is, for reports: "reference", "cuda"
    lora_linear_forward: Callable  # plain LoRA and PiSSA over a dense weight (layer.py)
    lora_linear_backward: Callable
    dora_linear_forward: Callable  # DoRA (dora.py)
    dora_linear_backward: Callable
    qlora_linear_forward: Callable  # plain LoRA over a quantized weight (qlora.py)
    qlora_linear_backward: Callable


REFERENCE_LORA_OPS = LoraOps(
    name="reference",
    lora_linear_forward=lora_linear_forward,
    lora_linear_backward=lora_linear_backward,
    dora_linear_forward=dora_linear_forward,
    dora_linear_backward=dora_linear_backward,
    qlora_linear_forward=qlora_linear_forward,
    qlora_linear_backward=qlora_linear_backward,
)
