"""A GPT with LoRA adapters on some of its linear layers: injection, real freezing, merging.

``add_lora(model, LoraConfig(...))`` returns a ``LoraGPT`` that shares the base model's weight
arrays and adds, next to each adapted weight, two trainable tensors named like it:

    transformer.h.0.attn.c_attn.weight    (C, 3C)  frozen
    transformer.h.0.attn.c_attn.lora_A    (r, C)   trainable
    transformer.h.0.attn.c_attn.lora_B    (3C, r)  trainable

Everything of the base is frozen (except biases chosen with ``bias``), so ``backward`` returns
gradients for the adapter only, the optimiser keeps state for the adapter only, and no frozen
weight ever gets its (C_in x C_out) weight-gradient product.

Merging is always an explicit call, never a side effect of switching to evaluation:
``merge()`` adds s A^T B^T into each adapted weight in place and routes the forward around the
adapter; ``unmerge()`` subtracts it again; ``merge_and_unload()`` returns a plain GPT with merged
copies of the weights and leaves this model untouched.
"""

from __future__ import annotations

from .backend import device_of
from .checkpoint import weights_fingerprint
from .layers import make_dropout_mask
from .lora import LoraLinearCache, lora_delta_weight, lora_linear_backward, lora_linear_forward, merge_weight
from .lora_config import LoraConfig, init_adapter, select_target_modules
from .model import GPT


class LoraGPT(GPT):
    """A GPT whose ``params`` hold the frozen base and the adapter tensors side by side."""

    def __init__(self, config, params: dict, lora_config: LoraConfig, base_fingerprint: str):
        self.lora_config = lora_config
        self.base_fingerprint = base_fingerprint  # of the base weights before any training
        self.original_biases = {}  # name -> the base's value of each bias the adapter trains (set by add_lora)
        self.adapted_modules = select_target_modules(lora_config, config)  # name -> (C_in, C_out)
        self.merged = False
        adapter_keys = {f"{m}.{factor}" for m in self.adapted_modules for factor in ("lora_A", "lora_B")}
        trainable = adapter_keys | set(self._trainable_biases(config, params))
        super().__init__(config, params, frozen=[name for name in params if name not in trainable])

    def _trainable_biases(self, config, params) -> list[str]:
        if self.lora_config.bias == "all":
            return [name for name in params if name.endswith(".bias")]
        if self.lora_config.bias == "lora_only":
            return [f"{m}.bias" for m in self.adapted_modules if f"{m}.bias" in params]
        return []

    def expected_shapes(self) -> dict:
        shapes = super().expected_shapes()
        r = self.lora_config.r
        for name, (C_in, C_out) in self.adapted_modules.items():
            shapes[f"{name}.lora_A"] = (r, C_in)
            shapes[f"{name}.lora_B"] = (C_out, r)
        return shapes

    @property
    def adapter_keys(self) -> list[str]:
        """The tensors that make up the adapter: every trainable parameter (lora_A, lora_B, chosen biases)."""
        return self.trainable_names

    @property
    def base_keys(self) -> list[str]:
        return [name for name in self.params if not name.endswith((".lora_A", ".lora_B"))]

    def linear_forward(self, name: str, x, dropout_rng=None):
        if name not in self.adapted_modules or self.merged:
            return super().linear_forward(name, x, dropout_rng)
        p = self.lora_config.lora_dropout
        mask = None if dropout_rng is None or p == 0 else make_dropout_mask(dropout_rng, x.shape, p, x.dtype)
        params = self.params
        return lora_linear_forward(x, params[f"{name}.weight"], params.get(f"{name}.bias"), params[f"{name}.lora_A"],
                                   params[f"{name}.lora_B"], self.lora_config.scaling, mask)

    def linear_backward(self, name: str, dout, cache, grads: dict):
        if not isinstance(cache, LoraLinearCache):
            return super().linear_backward(name, dout, cache, grads)
        weight, bias = f"{name}.weight", f"{name}.bias"
        dx, dW, db, dA, dB = lora_linear_backward(dout, cache, compute_dW=self.is_trainable(weight))
        grads[f"{name}.lora_A"], grads[f"{name}.lora_B"] = dA, dB
        if dW is not None:
            grads[weight] = dW
        if db is not None and self.is_trainable(bias):
            grads[bias] = db
        return dx

    def backward(self, cache, dloss: float = 1.0) -> dict:
        if self.merged:
            raise RuntimeError("the adapter is merged into the weights; unmerge() before training it")
        return super().backward(cache, dloss)

    def merge(self) -> None:
        """W <- W + s A^T B^T for every adapted weight, in place; the forward then skips the adapter.

        Every merged weight is computed and checked to be finite before any is written, so a failed
        merge changes nothing.
        """
        if self.merged:
            raise RuntimeError("the adapter is already merged; merging twice would add the update twice")
        merged = {name: merge_weight(self.params[f"{name}.weight"], *self._factors(name)) for name in self.adapted_modules}
        for name, value in merged.items():
            self.params[f"{name}.weight"][...] = value
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - s A^T B^T: back to the base weights (within float rounding) and the adapter path."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged; there is nothing to unmerge")
        for name in self.adapted_modules:
            W = self.params[f"{name}.weight"]
            W -= lora_delta_weight(*self._factors(name)).astype(W.dtype)
        self.merged = False

    def merge_and_unload(self) -> GPT:
        """A plain GPT with merged copies of the adapted weights: the base's parameter count and cost."""
        params = {name: self.params[name] for name in self.base_keys}
        if not self.merged:
            for name in self.adapted_modules:
                params[f"{name}.weight"] = merge_weight(self.params[f"{name}.weight"], *self._factors(name))
        return GPT(self.config, params)

    def is_noop(self) -> bool:
        """True while the adapter cannot change the output: every lora_B is 0, every trained bias unchanged."""
        xp = self.xp
        zero_B = all(not bool(xp.any(self.params[f"{m}.lora_B"])) for m in self.adapted_modules)
        return zero_B and all(bool(xp.array_equal(self.params[name], original))
                              for name, original in self.original_biases.items())

    def _factors(self, name: str):
        return self.params[f"{name}.lora_A"], self.params[f"{name}.lora_B"], self.lora_config.scaling


def add_lora(model: GPT, lora_config: LoraConfig, seed: int = 0) -> LoraGPT:
    """Wrap a base model with freshly initialised adapters (see lora_config.init_adapter).

    The LoRA model shares the base's weight arrays (merge() changes them in place), except biases
    that the adapter trains: those are copied, so that training never alters the base.
    """
    if isinstance(model, LoraGPT):
        raise TypeError("this model already has an adapter; add LoRA to the base model")
    modules = select_target_modules(lora_config, model.config)
    dtype = model.params["transformer.wte.weight"].dtype
    device = device_of(model.params["transformer.wte.weight"])
    adapter = init_adapter(lora_config, modules, seed=seed, dtype=dtype, device=device)
    params = {**model.params, **adapter}
    lora_model = LoraGPT(model.config, params, lora_config, weights_fingerprint(model.params))
    for name in lora_model.adapter_keys:
        if name.endswith(".bias"):
            lora_model.original_biases[name] = params[name]  # the base's own array, never trained
            params[name] = params[name].copy()
    return lora_model
