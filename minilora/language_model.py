"""What every minilora language model shares: a flat dict of named parameters, freezing, token-id
checks, and the linear layer as a hook by module name.

``GPT`` (model.py) and ``Llama`` (llama.py) build on it. A model holds its parameters in one flat
mapping from dotted names to arrays, says which are frozen, and calls its layer functions through
``self.ops`` (layers/ops.py), the reference layers unless a faster namespace is handed in from above.
Every linear layer goes through ``linear_forward`` / ``linear_backward`` by module name, which is
where LoRA adds its adapter path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .backend import get_xp
from .layers import REFERENCE_OPS
from .layers.quantized_linear import QuantizedLinearCache, quantized_linear_backward, quantized_linear_forward
from .quant.weight import QuantizedWeight


class LanguageModel(ABC):
    """A config, a flat parameter dict checked against the config's shapes, and the frozen names."""

    embedding_name = ""  # set by each model: the parameter whose array tells the device and dtype
    context_in_weights = True  # whether a parameter's shape depends on block_size (a position table)

    def __init__(self, config, params: dict, frozen=()):
        self.config = config
        expected = self.expected_shapes()
        missing = [name for name in expected if name not in params]
        unexpected = [name for name in params if name not in expected]
        if missing or unexpected:
            raise KeyError(f"parameters do not match the config: missing {missing}, unexpected {unexpected}")
        for name, shape in expected.items():
            if tuple(params[name].shape) != shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(params[name].shape)}, expected {shape}"
                )
        unknown_frozen = sorted(set(frozen) - set(params))
        if unknown_frozen:
            raise KeyError(f"cannot freeze unknown parameters {unknown_frozen}")
        self.params = params
        self.frozen = frozenset(frozen)
        self.ops = REFERENCE_OPS  # the layer functions the forward and backward call (layers/ops.py)

    @abstractmethod
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter the model must hold, with its shape (each model names its own)."""

    @property
    def xp(self):
        embedding = self.params[self.embedding_name]
        return embedding.xp if isinstance(embedding, QuantizedWeight) else get_xp(embedding)

    @property
    def trainable_names(self) -> list[str]:
        return [name for name in self.params if self.is_trainable(name)]

    def is_trainable(self, name: str) -> bool:
        """Not frozen, and not held quantized (blocks have no gradient: they are frozen by construction)."""
        return (
            name in self.params
            and name not in self.frozen
            and not isinstance(self.params[name], QuantizedWeight)
        )

    def num_parameters(self, trainable_only: bool = False) -> int:
        names = self.trainable_names if trainable_only else self.params
        return sum(int(self.params[name].size) for name in names)

    def check_token_ids(self, ids, what: str = "idx"):
        """Validate a (B, T) array of token ids, on the host, and move it to the model's device.

        CuPy wraps out-of-range indices around silently, so the range check must happen before the
        ids reach the GPU: pass host (NumPy) arrays. Device arrays are trusted to be checked already.
        """
        if ids.ndim != 2:
            raise ValueError(f"{what} must have shape (B, T), got {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
        T = ids.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"{what} has {T} positions, more than block_size={self.config.block_size}")
        if isinstance(ids, np.ndarray) and ids.size:
            bad = np.flatnonzero((ids < 0) | (ids >= self.config.vocab_size))
            if bad.size:
                position = np.unravel_index(bad[0], ids.shape)
                raise ValueError(
                    f"{what} holds token id {int(ids[position])} at position {tuple(int(i) for i in position)}, "
                    f"outside the vocabulary 0..{self.config.vocab_size - 1}"
                )
        return self.xp.asarray(ids)

    # Hooks for one linear layer, by module name (e.g. "transformer.h.0.attn.c_attn").
    # LoRA overrides these two to add its adapter path; dropout_rng serves its dropout.

    def linear_forward(self, name: str, x, dropout_rng=None):
        W, b = self.params[f"{name}.weight"], self.params.get(f"{name}.bias")
        if isinstance(W, QuantizedWeight):  # a frozen base held in blocks (QLoRA)
            return quantized_linear_forward(x, W, b)
        y, cache = self.ops.linear_forward(x, W, b)
        if not self.is_trainable(f"{name}.weight"):
            cache = cache._replace(x=None)  # only dW reads x: a frozen weight's input is let go at once
        return y, cache

    def linear_backward(self, name: str, dout, cache, grads: dict):
        """Backward of one linear layer; stores the trainable parameters' gradients in ``grads``."""
        weight, bias = f"{name}.weight", f"{name}.bias"
        if isinstance(cache, QuantizedLinearCache):  # frozen, so its only gradient is dx
            return quantized_linear_backward(dout, cache)
        dx, dW, db = self.ops.linear_backward(
            dout, cache, compute_dW=self.is_trainable(weight), compute_db=self.is_trainable(bias)
        )
        if dW is not None:
            grads[weight] = dW
        if db is not None:
            grads[bias] = db
        return dx

    def first_position(self, T: int, kv_cache=None) -> int:
        """Where the T new positions start: 0, or after the kv_cache.length cached ones in generation."""
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"{start} cached + {T} new positions exceed block_size={self.config.block_size}")
        return start

    def check_targets(self, targets, idx):
        """Targets checked like token ids, shaped like idx, and moved to the model's device."""
        targets = self.check_token_ids(targets, "targets")
        if targets.shape != idx.shape:
            raise ValueError(f"targets have shape {tuple(targets.shape)}, idx has {tuple(idx.shape)}")
        return targets

    def loss_forward(self, logits, targets, idx):
        """(mean cross-entropy, its cache) of the logits against targets shaped like idx; (None, None) without."""
        if targets is None:
            return None, None
        return self.ops.cross_entropy_forward(logits, self.check_targets(targets, idx))

    def check_cache(self, cache) -> None:
        """A backward needs a forward given targets, made by the layer functions the model uses now."""
        if cache is None or cache.loss is None:
            raise ValueError("backward needs a forward pass that was given targets")
        if cache.ops is not self.ops:  # a cache goes back to the backward of the code that made it
            raise ValueError(
                f"this cache was made by the {cache.ops.name!r} layer functions, but the model now "
                f"uses {self.ops.name!r}: run the forward again after changing model.ops"
            )
