"""The layer functions of a GPU training step: the fused kernels, swapped in pair by pair.

``CUDA_OPS`` is the reference namespace (``minilora.layers.REFERENCE_OPS``) with GELU, LayerNorm,
causal attention and softmax cross-entropy replaced by their fused kernels (``kernels/``), and the
Llama family's RMSNorm, SwiGLU and grouped-query attention by theirs (``kernels/llama.py``); the
linear layer, the embedding and dropout stay the reference's (their work is one cuBLAS product or
one indexing pass already). It takes CuPy float32 or float64 arrays. A model uses it when it is
handed in from above: ``model.ops = CUDA_OPS`` (``minilora.fast.accelerate`` does this).
"""

from __future__ import annotations

from dataclasses import replace

from ...layers import REFERENCE_OPS
from .kernels import attention, cross_entropy, gelu, layernorm, llama

CUDA_OPS = replace(
    REFERENCE_OPS,
    name="cuda",
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
    gqa_attention_forward=llama.gqa_attention_forward,
    gqa_attention_backward=llama.gqa_attention_backward,
)
