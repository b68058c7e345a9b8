"""The layers of GPT-2 and Llama-family transformers, each a forward/backward pair of plain functions.

Every ``name_forward(...)`` returns ``(out, cache)``; every ``name_backward(dout, cache)`` returns
fresh gradients for the forward's inputs, in the order they were passed. Caches are named tuples.
``ops.REFERENCE_OPS`` gathers the GPT-2 ones into the namespace a model calls (see ops.py); the
Llama-family ones (rmsnorm, rope, swiglu, gqa_attention) are not in it yet. ``flash_attention`` is
the tiled attention that a GPU kernel will follow; no model calls it.
"""

from .attention import (
    AttentionCache,
    attention_backward,
    attention_forward,
    cached_attention_forward,
    merge_heads,
)
from .cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from .dropout import dropout_backward, dropout_forward, make_dropout_mask
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .flash_attention import (
    FlashAttentionCache,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
)
from .gelu import GeluCache, gelu_backward, gelu_forward
from .gqa_attention import (
    GQAAttentionCache,
    cached_gqa_attention_forward,
    gqa_attention_backward,
    gqa_attention_forward,
    grouped_scaled_dot_product_attention,
    to_heads,
)
from .layernorm import LAYERNORM_EPS, LayerNormCache, layernorm_backward, layernorm_forward
from .linear import LinearCache, linear_backward, linear_forward
from .ops import REFERENCE_OPS, LayerOps
from .residual import residual_add
from .rmsnorm import RMSNormCache, rmsnorm_backward, rmsnorm_forward
from .rope import ROPE_PAIRINGS, RopeCache, rope_backward, rope_forward, rope_tables
from .swiglu import SwiGLUCache, sigmoid, swiglu_backward, swiglu_forward

__all__ = [
    "AttentionCache",
    "attention_backward",
    "attention_forward",
    "cached_attention_forward",
    "merge_heads",
    "CrossEntropyCache",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "dropout_backward",
    "dropout_forward",
    "make_dropout_mask",
    "EmbeddingCache",
    "embedding_backward",
    "embedding_forward",
    "FlashAttentionCache",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_forward",
    "GeluCache",
    "gelu_backward",
    "gelu_forward",
    "GQAAttentionCache",
    "cached_gqa_attention_forward",
    "gqa_attention_backward",
    "gqa_attention_forward",
    "grouped_scaled_dot_product_attention",
    "to_heads",
    "LAYERNORM_EPS",
    "LayerNormCache",
    "layernorm_backward",
    "layernorm_forward",
    "LinearCache",
    "linear_backward",
    "linear_forward",
    "LayerOps",
    "REFERENCE_OPS",
    "residual_add",
    "RMSNormCache",
    "rmsnorm_backward",
    "rmsnorm_forward",
    "ROPE_PAIRINGS",
    "RopeCache",
    "rope_backward",
    "rope_forward",
    "rope_tables",
    "SwiGLUCache",
    "sigmoid",
    "swiglu_backward",
    "swiglu_forward",
]
