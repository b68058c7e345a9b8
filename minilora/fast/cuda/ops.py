"""The layer functions of a GPU training step: the fused kernels, swapped in pair by pair.

``CUDA_OPS`` is the reference namespace (``minilora.layers.REFERENCE_OPS``) with GELU, LayerNorm,
causal attention and softmax cross-entropy replaced by their fused kernels (``kernels/``), the
Llama family's RMSNorm and SwiGLU (``kernels/llama.py``), RoPE (``kernels/rope.py``) and
grouped-query attention (``kernels/gqa_attention.py``, through the flash kernel) by theirs, and
the residual add and the linear layer's bias add by vectorised kernels (``kernels/add.py``,
``linear.py``); the linear layer's backward, the embedding and dropout stay the reference's (their
work is cuBLAS products or one indexing pass already). It takes CuPy float32, float64 or bfloat16
arrays. A model uses it when it is handed in from above: ``model.ops = CUDA_OPS``
(``minilora.fast.accelerate`` does this).

``CUDA_LORA_OPS`` is the adapter namespace (``minilora.lora.ops.REFERENCE_LORA_OPS``) with plain
LoRA's layer replaced by ``lora.py``'s, whose scale and adds are folded into cuBLAS products; DoRA
and QLoRA keep the reference's. An adapted model on a GPU is handed it as ``model.lora_ops``.
"""

from __future__ import annotations

from dataclasses import replace

from ...layers import REFERENCE_OPS
from ...lora.ops import REFERENCE_LORA_OPS
from . import linear, lora
from .kernels import add, attention, cross_entropy, gelu, gqa_attention, layernorm, llama, rope

CUDA_OPS = replace(
    REFERENCE_OPS,
    name="cuda",
    linear_forward=linear.linear_forward,
    residual_add=add.residual_add,
    gelu_forward=gelu.gelu_forward,
    gelu_backward=gelu.gelu_backward,
    layernorm_forward=layernorm.layernorm_forward,
    layernorm_backward=layernorm.layernorm_backward,
    attention_forward=attention.attention_forward,
    attention_backward=attention.attention_backward,
    cross_entropy_forward=cross_entropy.cross_entropy_forward,
    cross_entropy_backward=cross_entropy.cross_entropy_backward,
    rmsnorm_forward=llama.rmsnorm_forward,
    rmsnorm_backward=llama.rmsnorm_backward,
    swiglu_forward=llama.swiglu_forward,
    swiglu_backward=llama.swiglu_backward,
    rope_forward=rope.rope_forward,
    rope_backward=rope.rope_backward,
    gqa_attention_forward=gqa_attention.gqa_attention_forward,
    gqa_attention_backward=gqa_attention.gqa_attention_backward,
)

CUDA_LORA_OPS = replace(
    REFERENCE_LORA_OPS,
    name="cuda",
    lora_linear_forward=lora.lora_linear_forward,
    lora_linear_backward=lora.lora_linear_backward,
)
