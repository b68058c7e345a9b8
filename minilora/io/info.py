"""Human-readable descriptions of checkpoints and adapters (``minilora info``)."""

from __future__ import annotations

import math
from dataclasses import replace

from ..config import GPT_LINEAR_MODULES, GPTConfig
from ..lora.accounting import format_table, summary_line
from ..lora.config import LoraConfig
from .adapters import AdapterError, read_adapter
from .checkpoint import (
    BLOCK_NAME,
    CheckpointError,
    check_blocks_present,
    load_checkpoint,
    resolve_checkpoint_path,
)


def module_rows(shapes: dict) -> list[tuple[str, str, int]]:
    """(module, shape of its weight, parameters including its bias) for every module of a model."""
    rows = {}
    for name, shape in shapes.items():
        module, kind = name.rsplit(".", 1)
        label, count = rows.get(module, ("", 0))
        rows[module] = (
            (" x ".join(map(str, shape)) if kind == "weight" else label),
            count + math.prod(shape),
        )
    return [(module, label, count) for module, (label, count) in rows.items()]


def describe_checkpoint(path) -> str:
    path = resolve_checkpoint_path(path)
    checkpoint = load_checkpoint(path)
    meta = checkpoint.metadata
    lines = [f"checkpoint {path} ({path.stat().st_size:,} bytes)", f"kind: {meta.get('kind', 'unknown')}"]
    for key in ("corpus", "step", "val_bits_per_byte", "base", "adapter"):
        if key in meta:
            lines.append(f"{key}: {meta[key]}")
    if "provenance" in meta:
        prov = meta["provenance"]
        lines.append(
            f"made with minilora {prov.get('minilora_version')} on {prov.get('device')}, "
            f"commit {prov.get('git_commit')}, seed {prov.get('seed')}"
        )
    if "config" not in meta:
        raise CheckpointError(f"{path} has no model config in its metadata")
    config = GPTConfig.from_dict(meta["config"])
    check_blocks_present(config.n_layer, checkpoint.params, path)  # before anything sized by the config
    lines.append(f"config: {config.to_dict()}")
    dtypes = sorted({str(value.dtype) for value in checkpoint.params.values()})
    lines.append(f"stored as {', '.join(dtypes)}")
    lines.append(f"{'module':<32} {'weight shape':>14} {'parameters':>12}")
    for module, shape, count in module_rows(config.parameter_shapes()):
        lines.append(f"{module:<32} {shape:>14} {count:>12,}")
    total = sum(int(value.size) for value in checkpoint.params.values())
    lines.append(f"{'total':<32} {'':>14} {total:>12,}")
    return "\n".join(lines)


def adapter_rows(tensors: dict) -> list[dict]:
    """The per-module table of an adapter's own tensors: lora_A (r, C_in) and lora_B (C_out, r) of each."""
    modules = [name.removesuffix(".lora_A") for name in tensors if name.endswith(".lora_A")]
    rows = []
    for m in sorted(modules, key=module_order):
        (r, C_in), (C_out, _) = tensors[f"{m}.lora_A"].shape, tensors[f"{m}.lora_B"].shape
        rows.append(
            {"module": m, "weight_shape": (C_in, C_out), "r": r, "adapter_params": r * (C_in + C_out)}
        )
    return rows


def module_order(name: str) -> tuple:
    """Block by block, and within a block in the model's order (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)."""
    match = BLOCK_NAME.match(name)
    kind = name[match.end() :] if match else name
    return (
        int(match.group(1)) if match else -1,
        GPT_LINEAR_MODULES.index(kind) if kind in GPT_LINEAR_MODULES else 99,
        name,
    )


def parameter_count(config: GPTConfig) -> int:
    """The parameters of a GPT of ``config``, from one block's count: nothing sized by n_layer is built."""
    one, two = (
        sum(math.prod(s) for s in replace(config, n_layer=n).parameter_shapes().values()) for n in (1, 2)
    )
    return one + (config.n_layer - 1) * (two - one)


def check_adapter_blocks(tensors: dict, lora_config: LoraConfig, base_config: GPTConfig, source) -> None:
    """Raise AdapterError unless the blocks the adapter's tensors name fit the base_config it claims.

    Every block must exist in the base, and an adapter on every block (no layers_to_transform, and
    module names rather than a regular expression) must hold all n_layer of them.
    """
    blocks = {int(match.group(1)) for name in tensors if (match := BLOCK_NAME.match(name))}
    every_block = lora_config.layers_to_transform is None and (
        not isinstance(lora_config.target_modules, str) or lora_config.target_modules == "all-linear"
    )
    too_far = blocks and max(blocks) >= base_config.n_layer
    if too_far or (every_block and len(blocks) != base_config.n_layer):
        raise AdapterError(
            f"{source}: its base_config claims n_layer={base_config.n_layer}, but its tensors adapt "
            f"{len(blocks)} blocks ({sorted(blocks)[:3]}{'...' if len(blocks) > 3 else ''})"
        )


def describe_adapter(path) -> str:
    tensors, document = read_adapter(path)
    lora_config = LoraConfig.from_dict(document["lora_config"])
    base_config = GPTConfig.from_dict(document["base_config"])
    check_adapter_blocks(tensors, lora_config, base_config, path)
    trainable = sum(int(value.size) for value in tensors.values())
    base_total = parameter_count(base_config)
    biases = sum(int(value.size) for name, value in tensors.items() if name.endswith(".bias"))
    lines = [
        f"adapter {path} ({document['variant']}, format {document['format_version']})",
        f"r={lora_config.r} lora_alpha={lora_config.lora_alpha} scaling={document['scaling']:.4g} "
        f"rslora={lora_config.use_rslora} dropout={lora_config.lora_dropout} bias={lora_config.bias}",
        f"targets: {lora_config.target_modules}, layers: {lora_config.layers_to_transform or 'all'}",
        f"base: {base_config.to_dict()}",
        f"base fingerprint: {document['base_fingerprint']}",
    ]
    if "training" in document:
        lines.append(f"training: {document['training']}")
    lines.append(format_table(adapter_rows(tensors)))
    if biases:
        lines.append(f"plus {biases:,} trained bias parameters")
    # The adapter's biases replace base biases, so they are not added to the model's total.
    lines.append(summary_line(trainable, base_total + trainable - biases))
    return "\n".join(lines)
