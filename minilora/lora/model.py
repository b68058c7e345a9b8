"""A model with named LoRA adapters on its linear layers: injection, real freezing, merging, switching.

``add_lora(model, LoraConfig(...))`` returns a ``LoraGPT`` (or, for a Llama, a ``LoraLlama``, whose
modules carry PEFT's names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) over
the base model's weight arrays with
one adapter, "default", active. Its tensors sit in ``params`` next to the weight they adapt:

    transformer.h.0.attn.c_attn.weight    (C, 3C)  frozen
    transformer.h.0.attn.c_attn.lora_A    (r, C)   trainable
    transformer.h.0.attn.c_attn.lora_B    (3C, r)  trainable
    transformer.h.0.attn.c_attn.lora_magnitude_vector  (3C,)  trainable, DoRA only

Only the active adapter's tensors are trainable: ``backward`` returns gradients for them alone, the
optimiser keeps state for them alone, and no frozen weight gets its weight-gradient product.

Several adapters can share one frozen base: ``add_adapter`` another, ``set_adapter`` to switch,
``with model.disable_adapter():`` to run the base alone, ``delete_adapter``, and
``combine_adapters`` to build one exact weighted sum of several. ``params`` is always the same dict,
refilled with the base and the active adapter's tensors when the active adapter changes.

Each adapter has a variant object (variants.py), chosen once from its LoraConfig: plain LoRA, or
DoRA (``use_dora``, dora.py), which adds a magnitude vector per adapted weight. The model never
branches on the variant: ``linear_forward``, ``linear_backward``, ``merge`` and ``unmerge`` hand
each adapted module's weight and tensors to ``adapter.variant``, and store what it returns under
the module's names. PiSSA (``init="pissa"``) is plain LoRA with another start: lora_A and lora_B
from the top-r singular vectors of W, and the residual W - s lora_A^T lora_B^T frozen in place of W,
as a frozen tensor of the adapter, so the base stays intact. Every new adapter's tensors are made
in init.py.

Merging is an explicit call, never a side effect of evaluation: ``merge()`` writes the active
adapter into the weights in place (the base model's arrays, as PEFT does) and the forward skips
it; ``unmerge()`` undoes it; ``merge_and_unload()`` returns a plain GPT with merged copies.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache
from typing import NamedTuple

import numpy as np

from ..backend import device_of, get_xp, to_device, to_numpy, weights_fingerprint
from ..layers import make_dropout_mask
from ..llama import Llama
from ..model import GPT
from .config import LoraConfig, select_target_modules
from .init import Adapter, combined_adapter, create_adapter
from .ops import REFERENCE_LORA_OPS


class AdaptedLinearCache(NamedTuple):
    """What the forward of an adapted module keeps: the variant's backward for it, and its cache."""

    backward: object  # the variant's method that inverts the forward that ran (LoRA's, QLoRA's, DoRA's)
    layer: object  # its layer cache (a LoraLinearCache or a DoraCache)
    ops: object  # the LoraOps whose forward made ``layer``, and whose backward takes it (ops.py)


class LoraModel:
    """A model whose ``params`` hold the frozen base and the active adapter's tensors side by side.

    A mixin over a base model class: ``LoraGPT`` is a GPT and ``LoraLlama`` a Llama with adapters.
    """

    base_model_class = None  # the plain model that merge_and_unload() returns
    has_adapters = True

    def __init__(self, config, base_params: dict):
        self.base_params = dict(base_params)
        self.adapters: dict[str, Adapter] = {}
        self.active_adapter: str | None = None
        self.enabled = True
        self.merged = False
        self._unmerge_state = {}  # module name -> what its variant's merge() returned for unmerge()
        self._base_fingerprint = None
        self.lora_ops = REFERENCE_LORA_OPS  # the adapter layer functions; a fast path replaces it from above
        super().__init__(config, dict(base_params), frozen=list(base_params))
        self.base_formats = dict(self.formats)  # how each base weight is held, as it entered

    def use_layer_ops(self, ops, lora_ops=None) -> None:
        """The fast path's seam: the layer functions, and the adapter layers' (None: keep the current)."""
        super().use_layer_ops(ops)
        if lora_ops is not None:
            self.lora_ops = lora_ops

    def weight_dicts(self) -> tuple[dict, ...]:
        return (self.params, self.base_params)

    def uses_dropout(self) -> bool:
        """The model's own dropout, or the active adapter's on its input."""
        adapter = self._live_adapter()
        return super().uses_dropout() or (adapter is not None and adapter.config.lora_dropout > 0)

    def dense_reference(self):
        """A base weight held as an array (not quantized blocks): its device and dtype are the adapters'."""
        return next(self.base_params[name] for name in self.base_params if self.base_formats[name].trainable)

    # The active adapter and what it makes trainable.

    @property
    def adapter(self) -> Adapter:
        if self.active_adapter is None:
            raise RuntimeError("no adapter is active; set_adapter(name) first")
        return self.adapters[self.active_adapter]

    @property
    def lora_config(self) -> LoraConfig:
        return self.adapter.config

    @property
    def adapted_modules(self) -> dict:
        return self.adapter.modules

    @property
    def original_biases(self) -> dict:
        return self.adapter.original_biases

    def is_trainable(self, name: str) -> bool:
        return self.active_adapter is not None and name in self.adapter.trainable

    @property
    def trainable_names(self) -> list[str]:
        return [] if self.active_adapter is None else list(self.adapter.trainable)

    @property
    def adapter_keys(self) -> list[str]:
        """The active adapter's trainable tensors (lora_A, lora_B, magnitudes, chosen biases)."""
        return self.trainable_names

    @property
    def base_keys(self) -> list[str]:
        return list(self.base_params)

    @property
    def base_fingerprint(self) -> str:
        """SHA-256 of the base weights, taken before any merge (see backend.weights_fingerprint)."""
        if self._base_fingerprint is None:
            self._base_fingerprint = weights_fingerprint(self.base_params)
        return self._base_fingerprint

    def cast_base(self, dtype) -> None:
        """Hold the frozen base in ``dtype`` (mixed precision: a bf16 base under float32 adapters).

        The fingerprint stays that of the weights as they were loaded, so the saved adapter still
        names its base. Call it before training: the adapter's own tensors keep their dtype.
        """
        self._refuse_while_merged("cast the base")
        self._base_fingerprint = self.base_fingerprint  # taken now, of the weights as loaded
        for name in self.base_keys:
            self.base_params[name] = self.params[name] = self.params[name].astype(dtype, copy=False)

    def expected_shapes(self) -> dict:
        shapes = super().expected_shapes()
        if self.active_adapter is not None:
            shapes.update({name: tuple(value.shape) for name, value in self.adapter.tensors.items()})
        return shapes

    # Managing adapters.

    def add_adapter(self, name: str, lora_config: LoraConfig, seed: int = 0) -> None:
        """Add a freshly initialised adapter under ``name`` (it is not activated; see set_adapter).

        Its tensors come from init.create_adapter: drawn from a generator seeded with ``seed``, on the
        base's device, the trainable ones in at least float32 (float32 over a float16 base).
        """
        self._refuse_while_merged("add an adapter")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} exists already; delete_adapter({name!r}) first")
        modules = select_target_modules(lora_config, self.config)
        self.adapters[name] = create_adapter(
            lora_config, modules, self.base_params, self.dense_reference(), seed
        )

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: the base alone)."""
        self._refuse_while_merged("switch adapters")
        tensors = {} if name is None else self._named(name).tensors
        self.active_adapter = name
        self.params.clear()  # refilled in place: optimisers and callers keep a valid reference
        self.params.update(self.base_params)
        self.params.update(tensors)
        self.record_formats()

    def delete_adapter(self, name: str) -> None:
        self._refuse_while_merged("delete an adapter")
        self._named(name)
        del self.adapters[name]
        if self.active_adapter == name:
            self.set_adapter(None)

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block: ``with model.disable_adapter(): ...``.

        The adapter's own copies of base tensors (trained biases, PiSSA's residual weights) give way
        to the base's inside the block. A merged adapter is unmerged for the block and merged again
        after it, as PEFT does: the weights come back within rounding, not bit for bit.
        """
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        shadowing = [] if self.active_adapter is None else self.adapter.tensors  # names the adapter replaces
        own = {name: self.params[name] for name in shadowing if name in self.base_params}
        self.params.update({name: self.base_params[name] for name in own})
        self.record_formats()
        enabled, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = enabled
            self.params.update(own)
            self.record_formats()
            if was_merged:
                self.merge()

    def combine_adapters(self, names, weights, new_name: str) -> None:
        """Add ``new_name`` = the exact weighted sum of plain LoRA adapters, by concatenation.

        sum_i w_i s_i lora_A_i^T lora_B_i^T is one LoRA of rank r_1 + r_2 + ... and scale 1: each
        adapter's weight and scale fold into its lora_B (see init.combined_adapter). A module an
        adapter lacks counts as 0.
        """
        if len(names) != len(weights) or not names:
            raise ValueError(
                f"need one weight per adapter, got {len(names)} names and {len(weights)} weights"
            )
        parts = [self._named(name) for name in names]
        for name, part in zip(names, parts, strict=True):
            if not part.is_plain_lora:
                raise ValueError(
                    f"adapter {name!r} is not plain LoRA (DoRA, PiSSA or trained biases): "
                    "only plain adapters combine exactly by concatenation"
                )
        self.adapters[new_name] = combined_adapter(parts, weights, self.dense_reference())

    def _named(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; the adapters are {sorted(self.adapters)}")
        return self.adapters[name]

    def _refuse_while_merged(self, what: str) -> None:
        if self.merged:
            raise RuntimeError(f"the adapter is merged into the weights; unmerge() before you {what}")

    # The forward and backward of an adapted linear layer.

    def _live_adapter(self) -> Adapter | None:
        """The adapter the forward must apply: none when disabled, merged or absent."""
        if not self.enabled or self.merged or self.active_adapter is None:
            return None
        return self.adapter

    def _adapting(self, name: str) -> Adapter | None:
        """The adapter that applies to module ``name`` now, or None: the forward and backward both ask this."""
        adapter = self._live_adapter()
        return adapter if adapter is not None and name in adapter.modules else None

    def linear_forward(self, name: str, x, dropout_rng=None):
        """y = the active adapter's variant applied to module ``name`` (the base layer where none applies)."""
        adapter = self._adapting(name)
        if adapter is None:
            return super().linear_forward(name, x, dropout_rng)
        p = adapter.config.lora_dropout
        mask = None if dropout_rng is None or p == 0 else make_dropout_mask(dropout_rng, x.shape, p, x.dtype)
        weight = f"{name}.weight"
        y, layer, backward = adapter.variant.forward(
            x,
            self.params[weight],
            self.params.get(f"{name}.bias"),
            adapter.module_tensors(self.params, name),
            adapter.config.scaling,
            mask,
            ops=self.lora_ops,
            base=self.formats[weight],
        )
        return y, AdaptedLinearCache(backward=backward, layer=layer, ops=self.lora_ops)

    def linear_backward(self, name: str, dout, cache, grads: dict):
        """dx of module ``name``; the adapter's gradients go into ``grads`` under the module's names."""
        if self._adapting(name) is None:  # the forward ran the base layer here
            return super().linear_backward(name, dout, cache, grads)
        train_bias = self.is_trainable(f"{name}.bias")  # a frozen bias's gradient is not even summed
        dx, layer_grads = cache.backward(dout, cache.layer, compute_db=train_bias, ops=cache.ops)
        for suffix, grad in layer_grads.items():  # "lora_A" -> "transformer.h.0.attn.c_attn.lora_A"
            grads[f"{name}.{suffix}"] = grad
        return dx

    def backward(self, cache, dloss: float = 1.0) -> dict:
        """The adapter's gradients, each in its tensor's dtype (float32 over a float16 base)."""
        self._refuse_while_merged("train")
        if not self.enabled or self.active_adapter is None:
            raise RuntimeError("no adapter is enabled, so there is nothing to train")
        grads = super().backward(cache, dloss)
        return {name: grad.astype(self.params[name].dtype, copy=False) for name, grad in grads.items()}

    # Merging.

    def merged_weight(self, name: str):
        """The active adapter folded into module ``name``'s weight, as a new array (checked finite).

        Returns (merged weight, what unmerge needs: None for LoRA, the column norms n for DoRA).
        """
        adapter, weight = self.adapter, f"{name}.weight"
        tensors = adapter.module_tensors(self.params, name)
        return adapter.variant.merge(
            self.params[weight], tensors, adapter.config.scaling, self.formats[weight]
        )

    def merge(self) -> None:
        """Fold the active adapter into its weights in place; the forward then skips the adapter.

        Every merged weight is computed and checked to be finite before any is written, so a failed
        merge changes nothing.
        """
        if self.merged:
            raise RuntimeError("the adapter is already merged; merging twice would add the update twice")
        merged = {name: self.merged_weight(name) for name in self.adapted_modules}
        for name, (value, undo) in merged.items():
            self.params[f"{name}.weight"][...] = value
            self._unmerge_state[name] = undo
        self.merged = True

    def unmerge(self) -> None:
        """Undo merge(), within rounding, module by module through the variant.

        LoRA: W = W' - s lora_A^T lora_B^T; DoRA: W = W' n / m - s lora_A^T lora_B^T.
        """
        if not self.merged:
            raise RuntimeError("the adapter is not merged; there is nothing to unmerge")
        adapter = self.adapter
        for name in adapter.modules:
            W = self.params[f"{name}.weight"]
            tensors = adapter.module_tensors(self.params, name)
            undo = self._unmerge_state.pop(name)
            W[...] = adapter.variant.unmerge(W, tensors, adapter.config.scaling, undo)
        self.merged = False

    def merge_and_unload(self):
        """The plain model with merged copies of the adapted weights: the base's parameter count and cost.

        It shares no array that this model may still change: the merged weights and the adapter's
        tensors (trained biases, PiSSA's residuals) are its own copies, so a later ``unmerge()``,
        training step or ``merge()`` here leaves it as it was. The untouched frozen weights are shared.
        """
        params = {name: self.params[name] for name in self.base_params}
        adapter_tensors = [] if self.active_adapter is None else self.adapter.tensors
        for name in adapter_tensors:
            if name in params:
                params[name] = params[name].copy()  # a trained bias or a residual weight
        for name in self.adapted_modules:
            weight = f"{name}.weight"
            params[weight] = self.params[weight].copy() if self.merged else self.merged_weight(name)[0]
        return self.base_model_class(self.config, params)

    def is_noop(self) -> bool:
        """True while the adapter cannot change the output: its update is zero and no trained bias moved.

        Each module's variant judges its update (plain LoRA: lora_B is all zeros; a DoRA adapter never
        counts as a no-op by this test). PiSSA, whose factors start non-zero, never is one either.
        """
        adapter = self.adapter
        if adapter.config.init == "pissa":
            return False
        variant = adapter.variant
        unchanged = all(variant.is_noop(adapter.module_tensors(self.params, m)) for m in adapter.modules)
        return unchanged and all(
            bool(self.xp.array_equal(self.params[name], original))
            for name, original in adapter.original_biases.items()
        )


def reduce_rank(lora_A, lora_B, rank: int):
    """Factors of rank ``rank`` with the same product lora_A^T lora_B^T, when that product's rank allows.

    lora_A (k, C_in), lora_B (C_out, k) -> (rank, C_in), (C_out, rank), float64 NumPy. The product
    M = lora_A^T lora_B^T (C_in, C_out) has rank <= min(k, C_in, C_out), so when that is <= ``rank``
    the result is exact (to rounding); otherwise it is M's best rank-``rank`` approximation.

    With QR factorisations lora_A^T = Q_A R_A and lora_B = Q_B R_B, M = Q_A (R_A R_B^T) Q_B^T, and
    the small core R_A R_B^T = U S V^T gives M = (Q_A U) S (Q_B V)^T; S is shared evenly as in PiSSA.
    """
    Q_A, R_A = np.linalg.qr(to_numpy(lora_A).astype(np.float64).T)  # (C_in, j), (j, k)
    Q_B, R_B = np.linalg.qr(to_numpy(lora_B).astype(np.float64))  # (C_out, j'), (j', k)
    U, S, Vt = np.linalg.svd(R_A @ R_B.T)  # the core (j, j') = U S V^T
    root = np.sqrt(S[:rank])  # (rank,)
    lora_A_new = root[:, None] * (Q_A @ U[:, :rank]).T  # (rank, C_in)
    lora_B_new = (Q_B @ Vt[:rank].T) * root[None, :]  # (C_out, rank)
    # C order: safetensors' NumPy writer stores a transposed (Fortran-order) array's buffer as is
    return np.ascontiguousarray(lora_A_new), np.ascontiguousarray(lora_B_new)


def as_plain_lora(adapter: Adapter) -> tuple[LoraConfig, dict]:
    """A PiSSA adapter as an equivalent plain LoRA against the original base, of rank 2r (or less).

    PiSSA's layer computes W_res + s lora_A^T lora_B^T with W_res = W - s lora_A0^T lora_B0^T
    (lora_A0, lora_B0: the factors at the start), so its change to W is
    s (lora_A^T lora_B^T - lora_A0^T lora_B0^T) = s lora_A_cat^T lora_B_cat^T with
    lora_A_cat = [lora_A; lora_A0] and lora_B_cat = [lora_B, -lora_B0]. The scale stays s:
    lora_alpha becomes s * 2r (or s * sqrt(2r) with rsLoRA).

    A plain LoRA's rank may not exceed min(C_in, C_out) of any module it adapts, and with
    r > min(C_in, C_out) / 2 that change has rank at most min(C_in, C_out) < 2r anyway: then it is
    written exactly at that rank (reduce_rank, above; config.select_target_modules keeps PiSSA to
    ranks where this is exact), so that whatever is saved loads again.
    """
    config = adapter.config
    rank = min(2 * config.r, *(min(shape) for shape in adapter.modules.values()))
    alpha = config.scaling * (rank**0.5 if config.use_rslora else rank)
    plain = LoraConfig(**{**config.to_dict(), "r": rank, "lora_alpha": alpha, "init": "default"})
    tensors = {}
    for m in adapter.modules:
        lora_A, lora_B = adapter.tensors[f"{m}.lora_A"], adapter.tensors[f"{m}.lora_B"]
        lora_A0, lora_B0 = adapter.pissa_start[f"{m}.lora_A"], adapter.pissa_start[f"{m}.lora_B"]
        xp = get_xp(lora_A)
        lora_A_cat = xp.concatenate([lora_A, lora_A0], axis=0)  # (2r, C_in)
        lora_B_cat = xp.concatenate([lora_B, -lora_B0], axis=1)  # (C_out, 2r)
        if rank < 2 * config.r:  # the same product at the rank a plain LoRA may have
            lora_A_cat, lora_B_cat = (
                to_device(f.astype(lora_A.dtype), device_of(lora_A))
                for f in reduce_rank(lora_A_cat, lora_B_cat, rank)
            )
        tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"] = lora_A_cat, lora_B_cat
    tensors.update({name: adapter.tensors[name] for name in adapter.trainable if name.endswith(".bias")})
    return plain, tensors


@cache
def lora_class(model_class: type) -> type:
    """The LoRA model class of a family: ``LoraModel``'s adapter hooks in front of the family's class.

    ``lora_class(GPT)`` is ``LoraGPT``, whose ``linear_forward`` is LoraModel's and whose blocks are
    the GPT's. A new family needs no edit here: its LoRA class is made the first time it is asked for.
    """
    name = f"Lora{model_class.__name__}"
    namespace = {
        "base_model_class": model_class,
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"A {model_class.__name__} with named LoRA adapters.",
    }
    return type(name, (LoraModel, model_class), namespace)


LoraGPT = lora_class(GPT)
LoraLlama = lora_class(Llama)  # PEFT's module names: q_proj, k_proj, ..., down_proj


def lora_model_over(model) -> LoraModel:
    """``model`` itself if it has adapters already, else a LoRA model of its family over its weights."""
    return model if model.has_adapters else lora_class(type(model))(model.config, model.params)


def add_lora(model, lora_config: LoraConfig, seed: int = 0, adapter_name: str = "default") -> LoraModel:
    """Wrap a base model (a GPT, a Llama, any family) with one fresh adapter, active (see init.create_adapter).

    The LoRA model shares the base's weight arrays (merge() changes them in place); biases the
    adapter trains and PiSSA's residual weights are copies, so training never alters the base.
    """
    if model.has_adapters:
        raise TypeError("this model already has adapters; use its add_adapter() to add another")
    lora_model = lora_model_over(model)
    lora_model.add_adapter(adapter_name, lora_config, seed=seed)
    lora_model.set_adapter(adapter_name)
    return lora_model
