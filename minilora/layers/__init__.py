"""The layers of a GPT-2 transformer, each a forward/backward pair of plain functions.

Every ``name_forward(...)`` returns ``(out, cache)``; every ``name_backward(dout, cache)`` returns
fresh gradients for the forward's inputs, in the order they were passed. Caches are named tuples.
``ops.REFERENCE_OPS`` gathers them into the namespace a model calls (see ops.py).
"""

from .attention import AttentionCache, attention_backward, attention_forward, cached_attention_forward
from .cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from .dropout import dropout_backward, dropout_forward, make_dropout_mask
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .gelu import GeluCache, gelu_backward, gelu_forward
from .layernorm import LAYERNORM_EPS, LayerNormCache, layernorm_backward, layernorm_forward
from .linear import LinearCache, linear_backward, linear_forward
from .ops import REFERENCE_OPS, LayerOps

__all__ = [
    "AttentionCache",
    "attention_backward",
    "attention_forward",
    "cached_attention_forward",
    "CrossEntropyCache",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "dropout_backward",
    "dropout_forward",
    "make_dropout_mask",
    "EmbeddingCache",
    "embedding_backward",
    "embedding_forward",
    "GeluCache",
    "gelu_backward",
    "gelu_forward",
    "LAYERNORM_EPS",
    "LayerNormCache",
    "layernorm_backward",
    "layernorm_forward",
    "LinearCache",
    "linear_backward",
    "linear_forward",
    "LayerOps",
    "REFERENCE_OPS",
]
