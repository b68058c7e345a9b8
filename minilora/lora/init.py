"""Where an adapter's tensors come from: the Adapter record and every way a new one starts.

An adapter of rank r on a module with weight W (C_in, C_out) holds lora_A (r, C_in) and lora_B
(C_out, r), and, depending on its config, more:

    init="default"   lora_A ~ U(-1/sqrt(C_in), 1/sqrt(C_in)) (PEFT's Kaiming-uniform with a = sqrt(5)),
                     lora_B = 0, so the adapted model starts exactly at the base;
    init="gaussian"  lora_A ~ N(0, 1/r^2) (PEFT's "gaussian"), lora_B = 0;
    init="random"    lora_A as default and lora_B ~ U(-1/sqrt(r), 1/sqrt(r)): not a training init, but
                     one where every gradient path is non-zero, for gradient checks and teaching;
    init="pissa"     the factors from W's top-r singular triplets, and a frozen residual weight
                     W - s lora_A^T lora_B^T that replaces W for this adapter (Meng et al., 2024);
    use_dora         a magnitude per output unit, m = the column norms of W + s lora_A^T lora_B^T,
                     so that m / n = 1 at the start (see dora.py);
    bias             trained copies of the chosen biases (the base's own arrays are never written).

Every trainable tensor is held in at least float32 (``adapter_dtype``): over a float16 base, Adam's
epsilon of 1e-8 would round to 0 in float16 and the first step would divide 0 by 0 for lora_A.

Random numbers are drawn on the host from a seeded numpy Generator and moved with
``backend.to_device``, so CPU and GPU runs start from identical numbers. ``create_adapter`` is the
one entry point ``LoraGPT.add_adapter`` calls; ``combined_adapter`` builds the exact weighted sum of
plain adapters that ``LoraGPT.combine_adapters`` asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backend import device_of, get_xp, to_device, to_numpy
from .config import LoraConfig
from .dora import dora_weight_norm
from .variants import MAGNITUDE, DoraVariant, LoraVariant, variant_for


@dataclass
class Adapter:
    """One named adapter: its config, the modules it adapts, its tensors, and its variant."""

    config: LoraConfig
    modules: dict  # module name -> (C_in, C_out)
    tensors: dict  # parameter name -> array: the factors, DoRA magnitudes, trained biases, PiSSA residuals
    trainable: list  # the names in ``tensors`` that train (all but PiSSA's frozen residual weights)
    original_biases: dict = field(default_factory=dict)  # bias name -> the base's array, for is_noop
    pissa_start: dict = field(default_factory=dict)  # PiSSA: the initial factors (to express it against W)
    variant: LoraVariant | DoraVariant = field(init=False, compare=False)  # chosen once, from the config

    def __post_init__(self):
        self.variant = variant_for(self.config)

    def module_tensors(self, params: dict, module: str) -> dict:
        """The variant's tensors of ``module`` in ``params``, keyed by suffix ("lora_A", "lora_B", ...)."""
        return {suffix: params[f"{module}.{suffix}"] for suffix in self.variant.suffixes}

    @property
    def is_plain_lora(self) -> bool:
        """Only the two factors per module: no DoRA magnitudes, no PiSSA residuals, no trained biases."""
        return (
            isinstance(self.variant, LoraVariant)
            and self.config.init != "pissa"
            and len(self.trainable) == 2 * len(self.modules)
        )


def adapter_dtype(base_dtype):
    """The dtype of an adapter's trainable tensors: the base's, but at least float32 (float16 -> float32)."""
    return np.promote_types(base_dtype, np.float32)


def init_lora_factors(
    lora_config: LoraConfig, modules: dict, seed: int = 0, dtype=np.float32, device=None
) -> dict:
    """lora_A (r, C_in) and lora_B (C_out, r) for each module, by init "default", "gaussian" or "random".

    ``modules`` maps module names to weight shapes (C_in, C_out); the draws come module by module,
    lora_A then lora_B, from one generator seeded with ``seed``.
    """
    rng = np.random.default_rng(seed)
    r = lora_config.r
    factors = {}
    for name, (C_in, C_out) in modules.items():
        if lora_config.init == "gaussian":
            lora_A = rng.normal(0.0, 1.0 / r, (r, C_in))
        else:
            bound = 1.0 / np.sqrt(C_in)
            lora_A = rng.uniform(-bound, bound, (r, C_in))
        if lora_config.init == "random":
            lora_B = rng.uniform(-1.0 / np.sqrt(r), 1.0 / np.sqrt(r), (C_out, r))
        else:
            lora_B = np.zeros((C_out, r))
        factors[f"{name}.lora_A"] = to_device(lora_A.astype(dtype), device)
        factors[f"{name}.lora_B"] = to_device(lora_B.astype(dtype), device)
    return factors


def pissa_factors(W, r: int, scaling: float):
    """PiSSA's factors of one NumPy weight W (C_in, C_out): lora_A (r, C_in), lora_B (C_out, r), in W's dtype.

    init_pissa_factors hands it W in float64; a float32 W gives float32 factors.

    They hold W's top-r singular directions: s lora_A^T lora_B^T is the best rank-r approximation of
    W (in the Frobenius norm), and the singular values are split evenly between the two factors, so
    that lora_A has orthogonal rows, lora_B orthogonal columns, and lora_A lora_A^T = lora_B^T lora_B.

    Derivation (a7):
        W = U S V^T (U (C_in, k), V (C_out, k), S descending). With U_r, S_r, V_r the first r, take
        lora_A = sqrt(S_r / s) U_r^T and lora_B = V_r sqrt(S_r / s): then s lora_A^T lora_B^T =
        U_r S_r V_r^T (Eckart-Young: the best rank-r part), and both Gram matrices are S_r / s.
    """
    # BEGIN SOLUTION a7: the SVD of W, its top r singular triplets, shared evenly by the two factors
    U, S, Vt = np.linalg.svd(W, full_matrices=False)  # U (C_in, k), S (k,), Vt (k, C_out)
    root = np.sqrt(S[:r] / scaling)  # (r,)
    lora_A = root[:, None] * U[:, :r].T  # (r, C_in)
    lora_B = Vt[:r].T * root[None, :]  # (C_out, r)
    # END SOLUTION
    return lora_A, lora_B


def init_pissa_factors(lora_config: LoraConfig, weights: dict) -> tuple[dict, dict]:
    """PiSSA: factors from the top-r singular triplets of each W (``pissa_factors``), and the residuals.

    The frozen weight becomes the residual W - s lora_A^T lora_B^T, so the adapted layer starts
    exactly at the base. The SVD runs on the host in float64. Returns (factors, residual weights),
    both on the weights' device and dtype.
    """
    r, s = lora_config.r, lora_config.scaling
    factors, residuals = {}, {}
    for name, W in weights.items():
        device, dtype = device_of(W), adapter_dtype(W.dtype)
        W64 = to_numpy(W).astype(np.float64)
        lora_A, lora_B = pissa_factors(W64, r, s)  # (r, C_in), (C_out, r)
        factors[f"{name}.lora_A"] = to_device(lora_A.astype(dtype), device)
        factors[f"{name}.lora_B"] = to_device(lora_B.astype(dtype), device)
        residual = W64 - s * lora_A.T @ lora_B.T  # frozen: in the base's dtype
        residuals[f"{name}.weight"] = to_device(residual.astype(W.dtype), device)
    return factors, residuals


def init_dora_magnitudes(weights: dict, factors: dict, scaling: float) -> dict:
    """DoRA's m for each module: the column norms n of W + s lora_A^T lora_B^T, (C_out,), so m / n = 1."""
    return {
        f"{m}.{MAGNITUDE}": dora_weight_norm(W, factors[f"{m}.lora_A"], factors[f"{m}.lora_B"], scaling)
        for m, W in weights.items()
    }


def trainable_biases(lora_config: LoraConfig, modules: dict, params) -> list[str]:
    """The biases an adapter trains: none, all of the model's, or those of the adapted modules.

    ``params`` is anything keyed by parameter name (the parameters, or their shapes).
    """
    if lora_config.bias == "all":
        return [name for name in params if name.endswith(".bias")]
    if lora_config.bias == "lora_only":
        return [f"{m}.bias" for m in modules if f"{m}.bias" in params]
    return []


def create_adapter(
    lora_config: LoraConfig, modules: dict, base_params: dict, reference, seed: int = 0
) -> Adapter:
    """A new adapter on ``modules`` of the base, on the base's device; trainable tensors in ``adapter_dtype``.

    ``reference`` is a base weight held as an array: its device and dtype are the adapter's.
    Trainable, in this order: the factors (module by module), DoRA's magnitudes, the chosen biases.
    PiSSA's residual weights sit in ``tensors`` too, frozen.
    """
    if lora_config.init == "pissa":
        factors, residuals = init_pissa_factors(lora_config, {m: base_params[f"{m}.weight"] for m in modules})
    else:
        factors = init_lora_factors(
            lora_config, modules, seed=seed, dtype=adapter_dtype(reference.dtype), device=device_of(reference)
        )
        residuals = {}
    trained = dict(factors)
    if lora_config.use_dora:  # the magnitudes start at the norms of the weight this adapter's layer uses
        weights = {m: residuals.get(f"{m}.weight", base_params[f"{m}.weight"]) for m in modules}
        trained.update(init_dora_magnitudes(weights, factors, lora_config.scaling))
    biases = {
        name: base_params[name].astype(
            adapter_dtype(base_params[name].dtype)
        )  # a copy: the base stays intact
        for name in trainable_biases(lora_config, modules, base_params)
    }
    adapter = Adapter(
        lora_config,
        modules,
        {**trained, **residuals, **biases},
        trainable=[*trained, *biases],
        original_biases={name: base_params[name] for name in biases},
    )
    if lora_config.init == "pissa":
        adapter.pissa_start = {name: value.copy() for name, value in factors.items()}
    return adapter


def combined_adapter(parts: list[Adapter], weights, reference) -> Adapter:
    """The exact weighted sum of plain LoRA adapters, by concatenation; ``reference`` gives xp and dtype.

    sum_i w_i s_i lora_A_i^T lora_B_i^T = lora_A_cat^T lora_B_cat^T with lora_A_cat = [lora_A_1;
    lora_A_2; ...] (rank r_1 + r_2 + ...) and lora_B_cat = [w_1 s_1 lora_B_1, w_2 s_2 lora_B_2, ...]:
    each adapter's weight and scale are folded into its lora_B, and the new adapter has scale 1
    (lora_alpha = r). A module an adapter lacks counts as zero blocks of its rank.
    """
    modules = {m: shape for part in parts for m, shape in part.modules.items()}
    r = sum(part.config.r for part in parts)
    config = LoraConfig(r=r, lora_alpha=float(r), target_modules=tuple(modules), init="default")
    xp, dtype = get_xp(reference), adapter_dtype(reference.dtype)
    tensors = {}
    for m, (C_in, C_out) in modules.items():
        lora_A_blocks, lora_B_blocks = [], []
        for part, w in zip(parts, weights, strict=True):
            lora_A, lora_B = part.tensors.get(f"{m}.lora_A"), part.tensors.get(f"{m}.lora_B")
            if lora_A is None:  # this adapter leaves the module alone: a zero block of its rank
                r_part = part.config.r
                lora_A, lora_B = xp.zeros((r_part, C_in), dtype=dtype), xp.zeros((C_out, r_part), dtype=dtype)
            lora_A_blocks.append(lora_A)  # (r_part, C_in)
            lora_B_blocks.append((w * part.config.scaling) * lora_B)  # (C_out, r_part)
        tensors[f"{m}.lora_A"] = xp.concatenate(lora_A_blocks, axis=0)  # (r, C_in)
        tensors[f"{m}.lora_B"] = xp.concatenate(lora_B_blocks, axis=1).astype(dtype)  # (C_out, r)
    return Adapter(config, modules, tensors, trainable=list(tensors))
