"""The layers of GPT-2 and Llama-family transformers, each a forward/backward pair of plain functions.

Every ``name_forward(...)`` returns ``(out, cache)``; every ``name_backward(dout, cache)`` returns
fresh gradients for the forward's inputs, in the order they were passed. Caches are named tuples.
The files import only the backend and each other. ``ops.REFERENCE_OPS`` gathers the pairs of both
families into the namespace a model calls; a fast path hands a model its own (``minilora.fast``).

Reading order:

    linear.py            y = x W + b, W of shape (C_in, C_out); the backward can skip dW (LoRA's saving)
    gelu.py              GELU with GPT-2's tanh approximation
    cross_entropy.py     softmax and cross-entropy fused into one layer, a mean over the scored positions
    layernorm.py         LayerNorm over the channel axis; the cache keeps xhat and rstd
    embedding.py         token and position tables: a lookup, and a backward that sums repeated rows
    dropout.py           inverted dropout with an explicit mask
    residual.py          the residual sum x + branch, named so that a fast path can replace it
    attention.py         causal multi-head attention over the fused q, k, v, and its cached forward
    ops.py               LayerOps, the namespace of pairs a model calls, and REFERENCE_OPS
    rmsnorm.py           Llama's RMSNorm: LayerNorm without the mean and the bias
    rope.py              rotary position embeddings, in both pairings of a head's dimensions
    swiglu.py            the SwiGLU gate of Llama's MLP, silu(g) * u
    gqa_attention.py     grouped-query causal attention: fewer key/value heads than query heads
    quantized_linear.py  the linear layer and table lookup over a quantized frozen weight (QLoRA's base)
    flash_attention.py   attention tile by tile, never holding the (T, T) probabilities: the GPU's
                         flash kernel follows it; no model calls it
"""

from .attention import (
    AttentionCache,
    attention_backward,
    attention_forward,
    cached_attention_forward,
    merge_heads,
)
from .cross_entropy import IGNORE, CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
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
from .rope import ROPE_PAIRINGS, RopeCache, rope_backward, rope_forward, rope_tables, rope_tables_at
from .swiglu import SwiGLUCache, sigmoid, swiglu_backward, swiglu_forward

__all__ = [
    "AttentionCache",
    "attention_backward",
    "attention_forward",
    "cached_attention_forward",
    "merge_heads",
    "IGNORE",
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
    "rope_tables_at",
    "SwiGLUCache",
    "sigmoid",
    "swiglu_backward",
    "swiglu_forward",
]
