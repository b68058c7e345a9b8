"""What to adapt and how: LoraConfig and PEFT's rules for choosing the modules to adapt.

Names follow PEFT: r, lora_alpha, lora_dropout, target_modules, layers_to_transform, use_rslora,
bias. A module is one of the linear layers the model's config offers (``config.linear_modules()``:
a GPT's four per block, ``transformer.h.3.attn.c_attn``; a Llama's seven, ``model.layers.3.self_attn.q_proj``).
target_modules picks them the way PEFT does:

- a list of names matches every module whose name equals one of them or ends with "." + it, so
  "c_attn" picks every block's attention projection and "c_proj" both attn.c_proj and mlp.c_proj;
- the string "all-linear" picks every linear layer except the output head (tied to the embedding);
- any other single string is a regular expression that must match the whole module name.

layers_to_transform then keeps only the blocks it lists. The config also picks the adapter's
variant (use_dora: DoRA, see dora.py and variants.py) and its start (init, including "pissa"; the
tensors themselves are made in init.py).
"""

from __future__ import annotations

import numbers
import re
from dataclasses import asdict, dataclass
from functools import partial

from ..validate import ConfigFields, check_bool, check_float, check_int
from .layer import lora_scaling

INITS = ("default", "gaussian", "random", "pissa")
BIASES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class LoraConfig(ConfigFields):
    r: int = 8  # rank of the update
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / r (or / sqrt(r) with rsLoRA)
    lora_dropout: float = 0.0  # dropout on the adapter's input during training
    target_modules: tuple[str, ...] | str = ("c_attn",)  # see the module docstring
    layers_to_transform: tuple[int, ...] | None = None  # only these block indices; None: all
    use_rslora: bool = False  # scaling lora_alpha / sqrt(r) instead of lora_alpha / r
    init: str = "default"  # "default", "gaussian" (both lora_B = 0), "random" (lora_B != 0: checks), "pissa"
    bias: str = "none"  # also train "all" biases, or those of adapted modules ("lora_only")
    use_dora: bool = False  # DoRA: a trainable magnitude per output unit (see dora.py)
    dora_exact_gradient: bool = False  # DoRA: differentiate through the weight norm (the paper does not)

    def __post_init__(self):
        set_field = partial(object.__setattr__, self)
        set_field("target_modules", checked_target_modules(self.target_modules))
        set_field("layers_to_transform", checked_layers(self.layers_to_transform))
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        set_field("r", int(self.r))
        set_field("lora_alpha", check_float("LoraConfig.lora_alpha", self.lora_alpha, 0.0, low_open=True))
        set_field(
            "lora_dropout",
            check_float("LoraConfig.lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True),
        )
        for flag in ("use_rslora", "use_dora", "dora_exact_gradient"):
            set_field(flag, check_bool(f"LoraConfig.{flag}", getattr(self, flag)))
        if self.init not in INITS:
            raise ValueError(f"unknown LoRA init {self.init!r}; choose one of {INITS}")
        if self.bias not in BIASES:
            raise ValueError(f"unknown bias setting {self.bias!r}; choose one of {BIASES}")
        if self.use_dora and self.init == "pissa":
            raise ValueError("use_dora with init='pissa' is not supported: choose one variant")
        if self.dora_exact_gradient and not self.use_dora:
            raise ValueError("dora_exact_gradient needs use_dora=True")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def to_dict(self) -> dict:
        values = asdict(self)
        for key in ("target_modules", "layers_to_transform"):
            if isinstance(values[key], tuple):
                values[key] = list(values[key])
        return values


def checked_target_modules(targets) -> tuple[str, ...] | str:
    """target_modules as a tuple of names, or one string that is "all-linear" or a valid regular expression."""
    if isinstance(targets, (str, list, tuple)) and not targets:
        raise ValueError("target_modules is empty: name at least one module, e.g. ('c_attn',)")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(
                f"LoraConfig.target_modules {targets!r} is not a valid regular expression: {err}"
            ) from None
        return targets
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"LoraConfig.target_modules must be a string or a list of names, got {targets!r}")
    return tuple(targets)


def checked_layers(layers) -> tuple[int, ...] | None:
    """layers_to_transform as a tuple of block indices (one int is one block), or None for every block."""
    if layers is None:
        return None
    if isinstance(layers, (list, tuple)):
        return tuple(check_int("LoraConfig.layers_to_transform entry", i, minimum=0) for i in layers)
    return (check_int("LoraConfig.layers_to_transform", layers, minimum=0),)


def _matches(name: str, targets) -> bool:
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def block_ranges(blocks: list[int]) -> str:
    """Block indices as runs: [0, 1, 2, 5] -> "blocks 0-2, 5"; [3] -> "block 3"."""
    runs, start = [], blocks[0]
    for previous, index in zip(blocks, [*blocks[1:], None]):
        if index != previous + 1:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
            start = index
    return f"block{'s' if len(blocks) > 1 else ''} {', '.join(runs)}"


def module_summary(model_config) -> str:
    """The adaptable modules as their pattern, "blocks 0-29 x {self_attn.q_proj, ...}", not one name each."""
    blocks_of: dict[str, list[int]] = {}  # a module's name inside its block -> the blocks that have it
    outside = []  # modules in no block
    for name in model_config.linear_modules():
        block = next(
            (i for i in range(model_config.n_layer) if name.startswith(model_config.block_prefix(i))), None
        )
        if block is None:
            outside.append(name)
        else:
            blocks_of.setdefault(name.removeprefix(model_config.block_prefix(block)), []).append(block)
    groups: dict[tuple[int, ...], list[str]] = {}  # modules that the same blocks have, together
    for module, blocks in blocks_of.items():
        groups.setdefault(tuple(blocks), []).append(module)
    parts = [f"{block_ranges(list(blocks))} x {{{', '.join(modules)}}}" for blocks, modules in groups.items()]
    return "; ".join(parts + outside)


def select_target_modules(lora_config: LoraConfig, model_config) -> dict[str, tuple[int, int]]:
    """The modules to adapt, with their weight shapes; a clear error when the choice is not possible."""
    shapes = model_config.linear_modules()
    chosen = {name: shape for name, shape in shapes.items() if _matches(name, lora_config.target_modules)}
    if lora_config.layers_to_transform is not None:
        bad = [i for i in lora_config.layers_to_transform if not 0 <= i < model_config.n_layer]
        if bad:
            raise ValueError(
                f"layers_to_transform {bad} out of range: the model has blocks 0..{model_config.n_layer - 1}"
            )
        keep = {model_config.block_prefix(i) for i in lora_config.layers_to_transform}
        chosen = {name: shape for name, shape in chosen.items() if any(name.startswith(k) for k in keep)}
    if not chosen:
        raise ValueError(
            f"target_modules {lora_config.target_modules!r} match no module; the modules that can be "
            f"adapted are {module_summary(model_config)} (a name matches by suffix), or all-linear"
        )
    for name, (C_in, C_out) in chosen.items():
        if lora_config.r > min(C_in, C_out):
            raise ValueError(
                f"rank r={lora_config.r} is larger than min(C_in, C_out) = {min(C_in, C_out)} "
                f"of {name} (weight {C_in} x {C_out}): a rank-r update needs r <= both sides"
            )
    sides = {min(shape) for shape in chosen.values()}
    if lora_config.init == "pissa" and 2 * lora_config.r > min(sides) and len(sides) > 1:
        raise ValueError(
            f"PiSSA with r={lora_config.r} on modules whose smaller sides differ {sorted(sides)} cannot be "
            f"saved exactly as a plain LoRA (its change has rank up to 2r); choose r <= {min(sides) // 2}, "
            "or modules of one size"
        )
    return chosen
