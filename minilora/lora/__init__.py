"""LoRA from first principles: the adapted layer, its variants, and a GPT that carries adapters.

The files, in reading order:

    layer.py       the LoRA linear layer, y = x W + b + s (drop(x) lora_A^T) lora_B^T: forward,
                   hand-derived backward, merging (the students' assignment a5)
    dora.py        DoRA's layer: the same update, rescaled per output unit by a trained magnitude
    config.py      LoraConfig (PEFT's names) and which modules a config adapts
    ops.py         LoraOps, the namespace of adapter layer functions a variant calls (the seam a
                   fast path plugs into); REFERENCE_LORA_OPS holds the ones above
    variants.py    LoraVariant and DoraVariant: one adapted layer's forward, backward, merge and
                   unmerge, wired from the layer functions; ``variant_for(config)`` picks one
    init.py        the Adapter record and every new adapter's tensors: default, gaussian and random
                   factors, PiSSA's factors and residuals, DoRA's magnitudes, trained biases
    model.py       LoraGPT: adapters on a frozen GPT, real freezing, switching, merging; add_lora
    accounting.py  counting what an adapter trains, PEFT's summary line

It leaves out what plugs in from above: fused kernels and other fast paths (minilora.fast).
"""

from .config import LoraConfig
from .model import LoraGPT, LoraLlama, add_lora

__all__ = ["LoraConfig", "LoraGPT", "LoraLlama", "add_lora"]
