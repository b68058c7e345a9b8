"""LoRA from first principles: the adapted layer, its variants, and a model that carries adapters.

Reference code, like layers/: each adapter layer is a forward and a hand-derived backward, and the
model calls them through ``LoraOps`` (ops.py), the seam a fast path replaces from above
(``minilora.fast``); nothing here imports it.

Reading order:

    layer.py       the LoRA linear layer, y = x W + b + s (drop(x) lora_A^T) lora_B^T: forward,
                   hand-derived backward, merging (the students' assignment a5)
    dora.py        DoRA's layer: the same update, rescaled per output unit by a trained magnitude
    qlora.py       QLoRA's layer: plain LoRA beside a frozen weight held quantized
    config.py      LoraConfig (PEFT's names) and which modules a config adapts
    ops.py         LoraOps, the namespace of adapter layer functions a variant calls (the seam a
                   fast path plugs into); REFERENCE_LORA_OPS holds the ones above
    variants.py    LoraVariant and DoraVariant: one adapted layer's forward, backward, merge and
                   unmerge, wired from the layer functions; ``variant_for(config)`` picks one
    init.py        the Adapter record and every new adapter's tensors: default, gaussian and random
                   factors, PiSSA's factors and residuals, DoRA's magnitudes, trained biases
    model.py       LoraGPT and LoraLlama: adapters on a frozen base, real freezing, switching,
                   merging; add_lora
    accounting.py  counting what an adapter trains, PEFT's summary line and a per-module table
"""

from .config import LoraConfig
from .model import LoraGPT, LoraLlama, add_lora

__all__ = ["LoraConfig", "LoraGPT", "LoraLlama", "add_lora"]
