"""The seam between the model and its layer functions: a namespace of forward/backward pairs.

A model never imports its layer functions by name; it calls ``self.ops.gelu_forward(...)`` and so
on, where ``ops`` is a ``LayerOps``. The default, ``REFERENCE_OPS``, holds the readable functions of
this package. A fast path (``minilora.fast``) builds its own ``LayerOps`` with some pairs swapped for
specialised ones (in-place NumPy passes on the CPU, fused kernels on a GPU) and hands it to the
model from above: ``model.ops = ...``. Nothing here knows that those exist.

Each forward and its backward are swapped together, and the model remembers which namespace made a
forward's cache (``ModelCache.ops``), so a cache always goes back to the backward of the code that
made it: no backward ever has to guess who made its cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .attention import attention_backward, attention_forward, cached_attention_forward
from .cross_entropy import cross_entropy_backward, cross_entropy_forward
from .dropout import dropout_backward, dropout_forward, make_dropout_mask
from .embedding import embedding_backward, embedding_forward
from .gelu import gelu_backward, gelu_forward
from .gqa_attention import cached_gqa_attention_forward, gqa_attention_backward, gqa_attention_forward
from .layernorm import layernorm_backward, layernorm_forward
from .linear import linear_backward, linear_forward
from .residual import residual_add
from .rmsnorm import rmsnorm_backward, rmsnorm_forward
from .rope import rope_backward, rope_forward
from .swiglu import swiglu_backward, swiglu_forward


@dataclass(frozen=True)
class LayerOps:
    """Every layer function a model calls, by name; see the module docstring."""

    name: str  # what the namespace is, for reports: "reference", "cpu", "cuda"
    linear_forward: Callable
    linear_backward: Callable
    layernorm_forward: Callable
    layernorm_backward: Callable
    gelu_forward: Callable
    gelu_backward: Callable
    attention_forward: Callable
    attention_backward: Callable
    cached_attention_forward: Callable  # generation with a key/value cache: forward only
    embedding_forward: Callable
    embedding_backward: Callable
    dropout_forward: Callable
    dropout_backward: Callable
    make_dropout_mask: Callable
    residual_add: Callable  # x + branch: forward only (its backward is the identity on both paths)
    cross_entropy_forward: Callable
    cross_entropy_backward: Callable
    # The Llama family's layers (llama.py)
    rmsnorm_forward: Callable
    rmsnorm_backward: Callable
    rope_forward: Callable
    rope_backward: Callable
    swiglu_forward: Callable
    swiglu_backward: Callable
    gqa_attention_forward: Callable
    gqa_attention_backward: Callable
    cached_gqa_attention_forward: Callable  # generation with a key/value cache of H_kv heads: forward only


REFERENCE_OPS = LayerOps(
    name="reference",
    linear_forward=linear_forward,
    linear_backward=linear_backward,
    layernorm_forward=layernorm_forward,
    layernorm_backward=layernorm_backward,
    gelu_forward=gelu_forward,
    gelu_backward=gelu_backward,
    attention_forward=attention_forward,
    attention_backward=attention_backward,
    cached_attention_forward=cached_attention_forward,
    embedding_forward=embedding_forward,
    embedding_backward=embedding_backward,
    dropout_forward=dropout_forward,
    dropout_backward=dropout_backward,
    make_dropout_mask=make_dropout_mask,
    residual_add=residual_add,
    cross_entropy_forward=cross_entropy_forward,
    cross_entropy_backward=cross_entropy_backward,
    rmsnorm_forward=rmsnorm_forward,
    rmsnorm_backward=rmsnorm_backward,
    rope_forward=rope_forward,
    rope_backward=rope_backward,
    swiglu_forward=swiglu_forward,
    swiglu_backward=swiglu_backward,
    gqa_attention_forward=gqa_attention_forward,
    gqa_attention_backward=gqa_attention_backward,
    cached_gqa_attention_forward=cached_gqa_attention_forward,
)
