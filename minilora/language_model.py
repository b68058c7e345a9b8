"""What every minilora language model shares: a flat dict of named parameters, freezing, token-id
checks, and the linear layer as a hook by module name.

``GPT`` (model.py) and ``Llama`` (llama.py) build on it. A model holds its parameters in one flat
mapping from dotted names to arrays, says which are frozen, and calls its layer functions through
``self.ops`` (layers/ops.py), the reference layers unless a faster namespace is handed in from above.
Every linear layer goes through ``linear_forward`` / ``linear_backward`` by module name, which is
where LoRA adds its adapter path.

What a family is, the model asks its config (``parameter_shapes``, ``linear_modules``, ...: see
config.py); how each weight is held, dense or quantized, it records in ``formats`` when the weights
enter (weight_formats.py). Each family states, as class attributes, the facts its consumers need:
``embedding_name``, ``no_decay`` (the matrices AdamW leaves undecayed), ``peft_fan_in_fan_out`` and
``context_in_weights``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .activation_memory import check_frozen_head
from .layers import IGNORE, REFERENCE_OPS
from .validate import check_int
from .weight_formats import WeightFormat, format_of


class LinearHookCache(NamedTuple):
    """The linear hook's cache: the format whose forward ran (its backward takes ``layer``) and that cache."""

    format: WeightFormat
    layer: object  # the format's layer cache (a LinearCache, or a QuantizedLinearCache)


class LanguageModel:
    """A config, a flat parameter dict checked against the config's shapes, and the frozen names."""

    embedding_name = ""  # set by each model: the parameter whose array tells the device and dtype
    context_in_weights = True  # whether a parameter's shape depends on block_size (a position table)
    no_decay: tuple[str, ...] = ()  # matrices that AdamW leaves undecayed by default (optim.py)
    has_adapters = False  # a LoRA model (lora/model.py) says True
    supports_activation_memory = False  # whether gradient checkpointing and loss chunks are implemented
    gradient_checkpointing = False  # recompute each block's activations in the backward (when supported)
    loss_chunk_rows: int | None = None  # take the head and the loss this many rows at a time (when supported)

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
        self.record_formats()

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter the model must hold, with its shape: the config's (a LoRA model adds its own)."""
        return self.config.parameter_shapes()

    def record_formats(self) -> None:
        """Record how each parameter is held (weight_formats.py): called whenever weights enter ``params``."""
        self.formats = {name: format_of(value) for name, value in self.params.items()}

    def use_layer_ops(self, ops, lora_ops=None) -> None:
        """The seam for a fast path: the layer functions the forward and backward call from now on.

        ``lora_ops`` is the adapter layers' namespace, which only a LoRA model uses.
        """
        self.ops = ops

    def weight_dicts(self) -> tuple[dict, ...]:
        """Every dict of weights the model holds: its ``params`` (a LoRA model adds its base's)."""
        return (self.params,)

    def uses_dropout(self) -> bool:
        """Whether a training forward draws dropout masks (a CUDA graph, for one, cannot replay them)."""
        return self.config.dropout > 0

    def set_activation_memory(self, gradient_checkpointing: bool = False, loss_chunk_rows: int | None = None):
        """Turn the two switches that trade compute for activation memory, where the family has them.

        Loss chunks are refused here, before any step, for a trainable output head (activation_memory.py).
        """
        if not gradient_checkpointing and loss_chunk_rows is None:
            return
        if not self.supports_activation_memory:
            raise ValueError(
                f"gradient checkpointing and loss chunks are not implemented for {type(self).__name__}"
            )
        if loss_chunk_rows is not None:
            loss_chunk_rows = check_int("loss_chunk_rows", loss_chunk_rows, minimum=1)
            check_frozen_head(self)
        self.gradient_checkpointing, self.loss_chunk_rows = gradient_checkpointing, loss_chunk_rows

    @property
    def xp(self):
        embedding = self.params[self.embedding_name]
        return self.formats[self.embedding_name].array_module(embedding)

    @property
    def quantized_names(self) -> list[str]:
        """The parameters held as quantized blocks (QLoRA's frozen base)."""
        return [name for name, fmt in self.formats.items() if not fmt.trainable]

    @property
    def trainable_names(self) -> list[str]:
        return [name for name in self.params if self.is_trainable(name)]

    def is_trainable(self, name: str) -> bool:
        """Not frozen, and not held quantized (blocks have no gradient: they are frozen by construction)."""
        return name in self.params and name not in self.frozen and self.formats[name].trainable

    def num_parameters(self, trainable_only: bool = False) -> int:
        names = self.trainable_names if trainable_only else self.params
        return sum(int(self.params[name].size) for name in names)

    def check_token_ids(self, ids, what: str = "idx", ignore_allowed: bool = False):
        """Validate a (B, T) array of token ids, on the host, and move it to the model's device.

        CuPy wraps out-of-range indices around silently, so the range check must happen before the
        ids reach the GPU: pass host (NumPy) arrays. Device arrays are trusted to be checked already.
        ``ignore_allowed``: IGNORE may stand for an id (a target that is not scored, layers/cross_entropy.py).
        """
        if ids.ndim != 2:
            raise ValueError(f"{what} must have shape (B, T), got {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
        T = ids.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"{what} has {T} positions, more than block_size={self.config.block_size}")
        if isinstance(ids, np.ndarray) and ids.size:
            outside = (ids < 0) | (ids >= self.config.vocab_size)
            bad = np.flatnonzero(outside & (ids != IGNORE) if ignore_allowed else outside)
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
        """y = x W + b through the pair of the format W is held in; the cache keeps that format."""
        weight = f"{name}.weight"
        fmt = self.formats[weight]
        y, cache = fmt.linear_forward(self.ops, x, self.params[weight], self.params.get(f"{name}.bias"))
        if fmt.trainable and not self.is_trainable(weight):
            cache = cache._replace(x=None)  # only dW reads x: a frozen weight's input is let go at once
        return y, LinearHookCache(format=fmt, layer=cache)

    def linear_backward(self, name: str, dout, cache: LinearHookCache, grads: dict):
        """Backward of one linear layer; stores the trainable parameters' gradients in ``grads``."""
        weight, bias = f"{name}.weight", f"{name}.bias"
        dx, dW, db = cache.format.linear_backward(
            self.ops, dout, cache.layer, self.is_trainable(weight), self.is_trainable(bias)
        )
        if dW is not None:
            grads[weight] = dW
        if db is not None:
            grads[bias] = db
        return dx

    def check_positions(self, positions, idx):
        """Positions of packed rows, checked on the host, shaped like idx, and moved to the model's device.

        A packed row holds several examples one after another (training/examples.py); positions[b, t]
        is token t's position within its example, so each row counts 0, 1, 2, ... and starts again at
        0 where an example starts, and nowhere else.
        """
        if positions.shape != idx.shape:
            raise ValueError(f"positions have shape {tuple(positions.shape)}, idx has {tuple(idx.shape)}")
        if positions.dtype.kind not in "iu":
            raise TypeError(f"positions must hold integers, got dtype {positions.dtype}")
        if isinstance(positions, np.ndarray) and positions.size:
            before = np.concatenate([np.full((positions.shape[0], 1), -1), positions[:, :-1]], axis=1)
            bad = np.argwhere((positions != before + 1) & (positions != 0))
            if bad.size:
                b, t = (int(i) for i in bad[0])
                raise ValueError(
                    f"positions must count 0, 1, 2, ... within each example and restart at 0: row {b} has "
                    f"{int(positions[b, t])} at column {t}, after {int(before[b, t])}"
                )
        return self.xp.asarray(positions)

    def example_start(self, positions, T: int):
        """(B, T) where each token's example begins in its row, t - positions[b, t]; None for unpacked rows."""
        return None if positions is None else self.xp.arange(T) - positions

    def first_position(self, T: int, kv_cache=None) -> int:
        """Where the T new positions start: 0, or after the kv_cache.length cached ones in generation."""
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"{start} cached + {T} new positions exceed block_size={self.config.block_size}")
        return start

    def check_targets(self, targets, idx):
        """Targets checked like token ids (IGNORE allowed), shaped like idx, and moved to the model's device."""
        targets = self.check_token_ids(targets, "targets", ignore_allowed=True)
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
