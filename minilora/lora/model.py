"""A GPT with named LoRA adapters on its linear layers: injection, real freezing, merging, switching.

``add_lora(model, LoraConfig(...))`` returns a ``LoraGPT`` over the base model's weight arrays with
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

Variants, set in LoraConfig: DoRA (``use_dora``, see dora.py) adds a magnitude vector per adapted
weight. PiSSA (``init="pissa"``) starts A and B from the top-r singular vectors of W and freezes the
residual W - s A^T B^T in place of W, as a frozen tensor of the adapter, so the base stays intact.

Merging is an explicit call, never a side effect of evaluation: ``merge()`` writes the active
adapter into the weights in place (the base model's arrays, as PEFT does) and the forward skips
it; ``unmerge()`` undoes it; ``merge_and_unload()`` returns a plain GPT with merged copies.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..backend import device_of, get_xp, to_device, to_numpy
from ..io.checkpoint import weights_fingerprint
from .dora import DoraCache, column_norms, dora_linear_backward, dora_linear_forward, dora_merged_weight
from ..layers import make_dropout_mask
from .layer import (LoraLinearCache, lora_delta_weight, lora_linear_backward, lora_linear_forward, merge_weight,
                   require_finite)
from .config import LoraConfig, init_adapter, select_target_modules
from ..model import GPT

MAGNITUDE = "lora_magnitude_vector"


@dataclass
class Adapter:
    """One named adapter: its config, the modules it adapts, and its tensors."""

    config: LoraConfig
    modules: dict  # module name -> (C_in, C_out)
    tensors: dict  # parameter name -> array: the factors, DoRA magnitudes, trained biases, PiSSA residuals
    trainable: list  # the names in ``tensors`` that train (all but PiSSA's frozen residual weights)
    original_biases: dict = field(default_factory=dict)  # bias name -> the base's array, for is_noop
    pissa_start: dict = field(default_factory=dict)  # PiSSA: the initial factors, to express it against the base


class LoraGPT(GPT):
    """A GPT whose ``params`` hold the frozen base and the active adapter's tensors side by side."""

    def __init__(self, config, base_params: dict):
        self.base_params = dict(base_params)
        self.adapters: dict[str, Adapter] = {}
        self.active_adapter: str | None = None
        self.enabled = True
        self.merged = False
        self._merged_norms = {}  # DoRA: the column norms used by merge(), needed by unmerge()
        self._base_fingerprint = None
        super().__init__(config, dict(base_params), frozen=list(base_params))

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
        """SHA-256 of the base weights, taken before any merge (see checkpoint.weights_fingerprint)."""
        if self._base_fingerprint is None:
            self._base_fingerprint = weights_fingerprint(self.base_params)
        return self._base_fingerprint

    def expected_shapes(self) -> dict:
        shapes = super().expected_shapes()
        if self.active_adapter is not None:
            shapes.update({name: tuple(value.shape) for name, value in self.adapter.tensors.items()})
        return shapes

    # Managing adapters.

    def add_adapter(self, name: str, lora_config: LoraConfig, seed: int = 0) -> None:
        """Add a freshly initialised adapter under ``name`` (it is not activated; see set_adapter)."""
        self._refuse_while_merged("add an adapter")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} exists already; delete_adapter({name!r}) first")
        modules = select_target_modules(lora_config, self.config)
        xp_device = device_of(self.base_params["transformer.wte.weight"])
        dtype = self.base_params["transformer.wte.weight"].dtype
        if lora_config.init == "pissa":
            tensors, residuals = pissa_init(lora_config, {m: self.base_params[f"{m}.weight"] for m in modules})
        else:
            tensors = init_adapter(lora_config, modules, seed=seed, dtype=dtype, device=xp_device)
            residuals = {}
        if lora_config.use_dora:
            for m in modules:
                W = residuals.get(f"{m}.weight", self.base_params[f"{m}.weight"])
                V = W + lora_delta_weight(tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"], lora_config.scaling)
                tensors[f"{m}.{MAGNITUDE}"] = column_norms(V.astype(dtype))  # starts at the base's output
        adapter = Adapter(lora_config, modules, {**tensors, **residuals}, trainable=list(tensors))
        if lora_config.init == "pissa":
            adapter.pissa_start = {name: value.copy() for name, value in tensors.items()}
        for bias in trainable_biases(lora_config, modules, self.base_params):
            adapter.original_biases[bias] = self.base_params[bias]
            adapter.tensors[bias] = self.base_params[bias].copy()  # trained on a copy: the base stays intact
            adapter.trainable.append(bias)
        self.adapters[name] = adapter

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: the base alone)."""
        self._refuse_while_merged("switch adapters")
        tensors = {} if name is None else self._named(name).tensors
        self.active_adapter = name
        self.params.clear()  # refilled in place: optimisers and callers keep a valid reference
        self.params.update(self.base_params)
        self.params.update(tensors)

    def delete_adapter(self, name: str) -> None:
        self._refuse_while_merged("delete an adapter")
        self._named(name)
        del self.adapters[name]
        if self.active_adapter == name:
            self.set_adapter(None)

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block: ``with model.disable_adapter(): ...``."""
        enabled, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = enabled

    def combine_adapters(self, names, weights, new_name: str) -> None:
        """Add ``new_name`` = the exact weighted sum of plain LoRA adapters, by concatenation.

        sum_i w_i s_i A_i^T B_i^T = A_cat^T B_cat^T with A_cat = [A_1; A_2; ...] (rank r_1 + r_2 + ...)
        and B_cat = [w_1 s_1 B_1, w_2 s_2 B_2, ...]: each adapter's weight and scale are folded into its
        B, and the new adapter has scale 1 (lora_alpha = r). A module an adapter lacks counts as 0.
        """
        if len(names) != len(weights) or not names:
            raise ValueError(f"need one weight per adapter, got {len(names)} names and {len(weights)} weights")
        parts = [self._named(name) for name in names]
        for name, part in zip(names, parts):
            if part.config.use_dora or part.config.init == "pissa" or len(part.trainable) != 2 * len(part.modules):
                raise ValueError(f"adapter {name!r} is not plain LoRA (DoRA, PiSSA or trained biases): "
                                 "only plain adapters combine exactly by concatenation")
        modules = {m: shape for part in parts for m, shape in part.modules.items()}
        r = sum(part.config.r for part in parts)
        config = LoraConfig(r=r, lora_alpha=float(r), target_modules=tuple(modules), init="default")
        reference = self.base_params["transformer.wte.weight"]
        xp, dtype = get_xp(reference), reference.dtype
        tensors = {}
        for m, (C_in, C_out) in modules.items():
            blocks_A, blocks_B = [], []
            for part, w in zip(parts, weights):
                A, B = part.tensors.get(f"{m}.lora_A"), part.tensors.get(f"{m}.lora_B")
                if A is None:  # this adapter leaves the module alone: a zero block of its rank
                    A, B = xp.zeros((part.config.r, C_in), dtype=dtype), xp.zeros((C_out, part.config.r), dtype=dtype)
                blocks_A.append(A)
                blocks_B.append((w * part.config.scaling) * B)
            tensors[f"{m}.lora_A"] = xp.concatenate(blocks_A, axis=0)  # (r, C_in)
            tensors[f"{m}.lora_B"] = xp.concatenate(blocks_B, axis=1).astype(dtype)  # (C_out, r)
        self.adapters[new_name] = Adapter(config, modules, tensors, trainable=list(tensors))

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

    def linear_forward(self, name: str, x, dropout_rng=None):
        adapter = self._live_adapter()
        if adapter is None or name not in adapter.modules:
            return super().linear_forward(name, x, dropout_rng)
        config, params = adapter.config, self.params
        p = config.lora_dropout
        mask = None if dropout_rng is None or p == 0 else make_dropout_mask(dropout_rng, x.shape, p, x.dtype)
        W, b = params[f"{name}.weight"], params.get(f"{name}.bias")
        A, B = params[f"{name}.lora_A"], params[f"{name}.lora_B"]
        if config.use_dora:
            return dora_linear_forward(x, W, b, A, B, params[f"{name}.{MAGNITUDE}"], config.scaling, mask,
                                       exact_norm_gradient=config.dora_exact_gradient)
        return lora_linear_forward(x, W, b, A, B, config.scaling, mask)

    def linear_backward(self, name: str, dout, cache, grads: dict):
        bias = f"{name}.bias"
        if isinstance(cache, DoraCache):
            dx, db, dA, dB, dm = dora_linear_backward(dout, cache)
            grads[f"{name}.{MAGNITUDE}"] = dm
        elif isinstance(cache, LoraLinearCache):
            dx, _, db, dA, dB = lora_linear_backward(dout, cache, compute_dW=False,  # W is always frozen here
                                                     compute_db=self.is_trainable(bias))
        else:
            return super().linear_backward(name, dout, cache, grads)
        grads[f"{name}.lora_A"], grads[f"{name}.lora_B"] = dA, dB
        if db is not None and self.is_trainable(bias):
            grads[bias] = db
        return dx

    def backward(self, cache, dloss: float = 1.0) -> dict:
        self._refuse_while_merged("train")
        if not self.enabled or self.active_adapter is None:
            raise RuntimeError("no adapter is enabled, so there is nothing to train")
        return super().backward(cache, dloss)

    # Merging.

    def merged_weight(self, name: str):
        """The active adapter folded into module ``name``'s weight, as a new array (checked finite)."""
        config, params = self.lora_config, self.params
        W, A, B = params[f"{name}.weight"], params[f"{name}.lora_A"], params[f"{name}.lora_B"]
        if not config.use_dora:
            return merge_weight(W, A, B, config.scaling), None
        merged, norms = dora_merged_weight(W, A, B, params[f"{name}.{MAGNITUDE}"], config.scaling)
        return require_finite(merged), norms

    def merge(self) -> None:
        """Fold the active adapter into its weights in place; the forward then skips the adapter.

        Every merged weight is computed and checked to be finite before any is written, so a failed
        merge changes nothing.
        """
        if self.merged:
            raise RuntimeError("the adapter is already merged; merging twice would add the update twice")
        merged = {name: self.merged_weight(name) for name in self.adapted_modules}
        for name, (value, norms) in merged.items():
            self.params[f"{name}.weight"][...] = value
            if norms is not None:
                self._merged_norms[name] = norms
        self.merged = True

    def unmerge(self) -> None:
        """Undo merge(): W = W' - s A^T B^T (LoRA) or W = W' n / m - s A^T B^T (DoRA), within rounding."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged; there is nothing to unmerge")
        config = self.lora_config
        for name in self.adapted_modules:
            W = self.params[f"{name}.weight"]
            if config.use_dora:
                W *= self._merged_norms.pop(name) / self.params[f"{name}.{MAGNITUDE}"]
            W -= lora_delta_weight(self.params[f"{name}.lora_A"], self.params[f"{name}.lora_B"],
                                   config.scaling).astype(W.dtype)
        self.merged = False

    def merge_and_unload(self) -> GPT:
        """A plain GPT with merged copies of the adapted weights: the base's parameter count and cost."""
        params = {name: self.params[name] for name in self.base_params}
        if not self.merged:
            for name in self.adapted_modules:
                params[f"{name}.weight"] = self.merged_weight(name)[0]
        return GPT(self.config, params)

    def is_noop(self) -> bool:
        """True while the adapter cannot change the output: every lora_B is 0, every trained bias unchanged.

        (A DoRA adapter is never a no-op by this test once its magnitudes move; PiSSA never is.)
        """
        config, xp = self.lora_config, self.xp
        if config.init == "pissa" or config.use_dora:
            return False
        zero_B = all(not bool(xp.any(self.params[f"{m}.lora_B"])) for m in self.adapted_modules)
        return zero_B and all(bool(xp.array_equal(self.params[name], original))
                              for name, original in self.original_biases.items())


def as_plain_lora(adapter: Adapter) -> tuple[LoraConfig, dict]:
    """A PiSSA adapter as an equivalent plain LoRA against the original base, of rank 2r.

    PiSSA's layer computes W_res + s A^T B^T with W_res = W - s A0^T B0^T (A0, B0: the factors at the
    start), so its change to W is s (A^T B^T - A0^T B0^T) = s A_cat^T B_cat^T with A_cat = [A; A0]
    and B_cat = [B, -B0]. The scale stays s: lora_alpha becomes s * 2r (or s * sqrt(2r) with rsLoRA).
    """
    config = adapter.config
    r2 = 2 * config.r
    alpha = config.scaling * (r2**0.5 if config.use_rslora else r2)
    plain = LoraConfig(**{**config.to_dict(), "r": r2, "lora_alpha": alpha, "init": "default"})
    tensors = {}
    for m in adapter.modules:
        A, B = adapter.tensors[f"{m}.lora_A"], adapter.tensors[f"{m}.lora_B"]
        A0, B0 = adapter.pissa_start[f"{m}.lora_A"], adapter.pissa_start[f"{m}.lora_B"]
        xp = get_xp(A)
        tensors[f"{m}.lora_A"] = xp.concatenate([A, A0], axis=0)  # (2r, C_in)
        tensors[f"{m}.lora_B"] = xp.concatenate([B, -B0], axis=1)  # (C_out, 2r)
    tensors.update({name: adapter.tensors[name] for name in adapter.trainable if name.endswith(".bias")})
    return plain, tensors


def trainable_biases(lora_config: LoraConfig, modules: dict, params: dict) -> list[str]:
    """The biases an adapter trains: none, all of the model's, or those of the adapted modules."""
    if lora_config.bias == "all":
        return [name for name in params if name.endswith(".bias")]
    if lora_config.bias == "lora_only":
        return [f"{m}.bias" for m in modules if f"{m}.bias" in params]
    return []


def pissa_init(lora_config: LoraConfig, weights: dict) -> tuple[dict, dict]:
    """PiSSA (Meng et al., 2024): factors from the top-r singular triplets of each W, and the residual.

    W = U S V^T (W is (C_in, C_out), U (C_in, k), V (C_out, k)). With the scale s, take
    A = sqrt(S_r / s) U_r^T (r, C_in) and B = V_r sqrt(S_r / s) (C_out, r), so that
    s A^T B^T = U_r S_r V_r^T, the best rank-r part of W; the frozen weight becomes the residual
    W - s A^T B^T, and the adapted layer starts exactly at the base. The SVD runs on the host in
    float64. Returns (factors, residual weights), both on the weights' device and dtype.
    """
    r, s = lora_config.r, lora_config.scaling
    factors, residuals = {}, {}
    for name, W in weights.items():
        device, dtype = device_of(W), W.dtype
        W64 = to_numpy(W).astype(np.float64)
        U, S, Vt = np.linalg.svd(W64, full_matrices=False)  # U (C_in, k), S (k,), Vt (k, C_out)
        root = np.sqrt(S[:r] / s)  # (r,)
        A = root[:, None] * U[:, :r].T  # (r, C_in)
        B = Vt[:r].T * root[None, :]  # (C_out, r)
        factors[f"{name}.lora_A"] = to_device(A.astype(dtype), device)
        factors[f"{name}.lora_B"] = to_device(B.astype(dtype), device)
        residuals[f"{name}.weight"] = to_device((W64 - s * A.T @ B.T).astype(dtype), device)
    return factors, residuals


def add_lora(model: GPT, lora_config: LoraConfig, seed: int = 0, adapter_name: str = "default") -> LoraGPT:
    """Wrap a base model with one freshly initialised adapter, active (see lora_config.init_adapter).

    The LoRA model shares the base's weight arrays (merge() changes them in place); biases the
    adapter trains and PiSSA's residual weights are copies, so training never alters the base.
    """
    if isinstance(model, LoraGPT):
        raise TypeError("this model already has adapters; use its add_adapter() to add another")
    lora_model = LoraGPT(model.config, model.params)
    lora_model.add_adapter(adapter_name, lora_config, seed=seed)
    lora_model.set_adapter(adapter_name)
    return lora_model
