"""Human-readable descriptions of checkpoints and adapters (``minilora info``)."""

from __future__ import annotations

import math

from ..config import GPTConfig
from ..lora.accounting import format_table, lora_parameter_table, summary_line
from ..lora.config import LoraConfig
from ..model import parameter_shapes
from .adapters import read_adapter
from .checkpoint import load_checkpoint, resolve_checkpoint_path


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
    config = GPTConfig.from_dict(meta["config"])
    lines.append(f"config: {config.to_dict()}")
    dtypes = sorted({str(value.dtype) for value in checkpoint.params.values()})
    lines.append(f"stored as {', '.join(dtypes)}")
    lines.append(f"{'module':<32} {'weight shape':>14} {'parameters':>12}")
    for module, shape, count in module_rows(parameter_shapes(config)):
        lines.append(f"{module:<32} {shape:>14} {count:>12,}")
    total = sum(int(value.size) for value in checkpoint.params.values())
    lines.append(f"{'total':<32} {'':>14} {total:>12,}")
    return "\n".join(lines)


def describe_adapter(path) -> str:
    tensors, document = read_adapter(path)
    lora_config = LoraConfig.from_dict(document["lora_config"])
    base_config = GPTConfig.from_dict(document["base_config"])
    trainable = sum(int(value.size) for value in tensors.values())
    base_total = sum(math.prod(shape) for shape in parameter_shapes(base_config).values())
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
    lines.append(format_table(lora_parameter_table(lora_config, base_config)))
    if biases:
        lines.append(f"plus {biases:,} trained bias parameters")
    # The adapter's biases replace base biases, so they are not added to the model's total.
    lines.append(summary_line(trainable, base_total + trainable - biases))
    return "\n".join(lines)
