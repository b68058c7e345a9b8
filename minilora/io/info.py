"""Human-readable descriptions of every file minilora writes (``minilora info``).

``describe(path)`` names the artifact by what is on disk and hands it to its describer (ARTIFACTS):
a GGUF file (SmolLM2's, or any llama GGUF); a minilora adapter or the run folder that holds one (a
LoRA fine-tune of a GPT or of SmolLM2, quantized or not, with the run's before and after); a PEFT
adapter folder (``export-peft``); a Hugging Face checkpoint folder (``merge --base smollm2``); and
otherwise a minilora checkpoint (pretraining, a full fine-tune, a merge, a run's state), a file or
the run folder that holds ``checkpoint.safetensors``. Nothing is computed but counts: the large
files are read from their headers alone.

A config stored in a file names no family: the family is the one whose fields the stored dict
holds (each family's config has its own, a Llama's n_kv_head and ffn_hidden among them).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

from safetensors import safe_open

from ..config import GPTConfig
from ..llama import LlamaConfig
from ..lora.accounting import format_table, summary_line
from ..lora.config import LoraConfig
from .adapters import ADAPTER_WEIGHTS, AdapterError, read_adapter
from .checkpoint import CheckpointError, load_checkpoint, previous_path, resolve_checkpoint_path
from .hf_checkpoint import HF_CONFIG, HF_WEIGHTS
from .json_text import read_json_object
from .peft import PEFT_CONFIG, PEFT_WEIGHTS

FAMILY_CONFIGS = (GPTConfig, LlamaConfig)  # every family whose config minilora stores in its files
RUN_METRICS = "finetune_metrics.json"  # jobs/finetune.py writes it at the end of a run


def config_from_dict(values, source):
    """The config a file stores, of the family whose fields it holds; a CheckpointError if none has them."""
    for family in FAMILY_CONFIGS:
        if isinstance(values, dict) and set(values) == {field.name for field in fields(family)}:
            return family.from_dict(values)
    raise CheckpointError(f"{source}: its config {values!r} is no family's (a GPT's or a Llama's)")


def block_pattern(config) -> re.Pattern:
    """The names of block i begin with ``config.block_prefix(i)``: the pattern that reads i back."""
    first = config.block_prefix(0)
    return re.compile(re.escape(first.removesuffix("0.")) + r"(\d+)\.")


def blocks_named(config, names) -> set[int]:
    """The block indices that ``names`` (parameters or adapter tensors) belong to."""
    pattern = block_pattern(config)
    return {int(match.group(1)) for name in names if (match := pattern.match(name))}


def check_blocks_held(config, names, source) -> None:
    """Raise CheckpointError unless ``names`` hold blocks 0 .. n_layer - 1 and no others.

    A config's n_layer sizes everything built from it, so a file claiming n_layer = 3,000,000 beside
    two blocks of tensors is refused before anything of that size is made.
    """
    blocks = blocks_named(config, names)
    if blocks != set(range(len(blocks))) or len(blocks) != config.n_layer:
        held = f"blocks {sorted(blocks)[:3]}{'...' if len(blocks) > 3 else ''}" if blocks else "no blocks"
        raise CheckpointError(
            f"{source}: its config claims n_layer={config.n_layer}, but its tensors hold {len(blocks)} "
            f"({held}, named {config.block_prefix(0).removesuffix('0.')}<i>.)"
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


def tensor_rows(shapes: dict) -> list[tuple[str, str, int]]:
    """(tensor, its shape, its parameters) for every tensor stored: a LoRA run's lora_A and lora_B each."""
    return [(name, " x ".join(map(str, shape)), math.prod(shape)) for name, shape in shapes.items()]


def module_table(shapes: dict, rows=module_rows, header=("module", "weight shape")) -> list[str]:
    """The lines of a table of ``rows(shapes)`` (name, shape, parameters) and its total."""
    lines = [f"{header[0]:<40} {header[1]:>14} {'parameters':>12}"]
    for module, shape, count in rows(shapes):
        lines.append(f"{module:<40} {shape:>14} {count:>12,}")
    lines.append(f"{'total':<40} {'':>14} {sum(math.prod(shape) for shape in shapes.values()):>12,}")
    return lines


def provenance_line(meta: dict) -> list[str]:
    """The line that says what made a file, if its metadata records it."""
    if "provenance" not in meta:
        return []
    prov = meta["provenance"]
    return [
        f"made with minilora {prov.get('minilora_version')} on {prov.get('device')}, "
        f"commit {prov.get('git_commit')}, seed {prov.get('seed')}"
    ]


def describe_checkpoint(path) -> str:
    """A minilora checkpoint: its kind, what made it, its config and its parameter table.

    A LoRA run's state file (``finetune_state.safetensors``) holds the adapter's tensors, not the
    model: its table is of the tensors stored; any other checkpoint must hold every block of its config.
    """
    path = resolve_checkpoint_path(path)
    checkpoint = load_checkpoint(path)
    meta = checkpoint.metadata
    lines = [f"checkpoint {path} ({path.stat().st_size:,} bytes)", f"kind: {meta.get('kind', 'unknown')}"]
    for key in ("mode", "corpus", "step", "val_bits_per_byte", "base", "quantized", "adapter"):
        if meta.get(key) is not None:
            lines.append(f"{key}: {meta[key]}")
    lines += provenance_line(meta)
    if "config" not in meta:
        raise CheckpointError(f"{path} has no model config in its metadata")
    config = config_from_dict(meta["config"], path)
    holds_the_model = meta.get("mode") != "lora"
    if holds_the_model:
        check_blocks_held(config, checkpoint.params, path)  # before anything sized by the config
    lines.append(f"config ({config.family}): {config.to_dict()}")
    dtypes = sorted({str(value.dtype) for value in checkpoint.params.values()})
    lines.append(f"stored as {', '.join(dtypes)}")
    if holds_the_model:
        lines += module_table(config.parameter_shapes())
    else:
        lines.append("the trainable tensors of a LoRA run (with its optimiser state), not the model:")
        stored = {name: tuple(value.shape) for name, value in checkpoint.params.items()}
        lines += module_table(stored, tensor_rows, ("tensor", "shape"))
    return "\n".join(lines)


def adapter_rows(tensors: dict, config) -> list[dict]:
    """The per-module table of an adapter's own tensors: lora_A (r, C_in) and lora_B (C_out, r) of each."""
    modules = [name.removesuffix(".lora_A") for name in tensors if name.endswith(".lora_A")]
    rows = []
    for m in sorted(modules, key=module_order(config)):
        (r, C_in), (C_out, _) = tensors[f"{m}.lora_A"].shape, tensors[f"{m}.lora_B"].shape
        rows.append(
            {"module": m, "weight_shape": (C_in, C_out), "r": r, "adapter_params": r * (C_in + C_out)}
        )
    return rows


def module_order(config):
    """The sort key of module names: block by block, and within a block in the family's order."""
    in_block = [
        name.removeprefix(config.block_prefix(0)) for name in replace(config, n_layer=1).linear_modules()
    ]
    pattern = block_pattern(config)

    def key(name: str) -> tuple:
        match = pattern.match(name)
        kind = name[match.end() :] if match else name
        return (int(match.group(1)) if match else -1, in_block.index(kind) if kind in in_block else 99, name)

    return key


def parameter_count(config) -> int:
    """The parameters of a model of ``config``, from one block's count: nothing sized by n_layer is built."""
    one, two = (
        sum(math.prod(s) for s in replace(config, n_layer=n).parameter_shapes().values()) for n in (1, 2)
    )
    return one + (config.n_layer - 1) * (two - one)


def check_adapter_blocks(tensors: dict, lora_config: LoraConfig, base_config, source) -> None:
    """Raise AdapterError unless the blocks the adapter's tensors name fit the base_config it claims.

    Every block must exist in the base, and an adapter on every block (no layers_to_transform, and
    module names rather than a regular expression) must hold all n_layer of them.
    """
    blocks = blocks_named(base_config, tensors)
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
    """A minilora adapter: its LoRA settings, its base, the per-module table and the trainable share."""
    tensors, document = read_adapter(path)
    lora_config = LoraConfig.from_dict(document["lora_config"])
    base_config = config_from_dict(document["base_config"], path)
    check_adapter_blocks(tensors, lora_config, base_config, path)
    trainable = sum(int(value.size) for value in tensors.values())
    base_total = parameter_count(base_config)
    biases = sum(int(value.size) for name, value in tensors.items() if name.endswith(".bias"))
    lines = [
        f"adapter {path} ({document['variant']}, format {document['format_version']})",
        f"r={lora_config.r} lora_alpha={lora_config.lora_alpha} scaling={document['scaling']:.4g} "
        f"rslora={lora_config.use_rslora} dropout={lora_config.lora_dropout} bias={lora_config.bias}",
        f"targets: {lora_config.target_modules}, layers: {lora_config.layers_to_transform or 'all'}",
        f"base ({base_config.family}): {base_config.to_dict()}",
        f"base fingerprint: {document['base_fingerprint']}",
    ]
    if "training" in document:
        lines.append(f"training: {document['training']}")
    lines.append(format_table(adapter_rows(tensors, base_config)))
    if biases:
        lines.append(f"plus {biases:,} trained bias parameters")
    # The adapter's biases replace base biases, so they are not added to the model's total.
    lines.append(summary_line(trainable, base_total + trainable - biases))
    return "\n".join(lines)


def run_line(folder: Path) -> list[str]:
    """What a finished fine-tuning run in ``folder`` did, from its finetune_metrics.json (none while it runs)."""
    metrics_path = folder / RUN_METRICS
    if not metrics_path.is_file():
        return []
    metrics = read_json_object(metrics_path, CheckpointError)
    held = f", held {metrics['quantized']}" if metrics.get("quantized") else ""
    return [
        f"run: {metrics.get('mode')} fine-tuning of {metrics.get('base')}{held} on {metrics.get('corpus')}, "
        f"{metrics.get('settings', {}).get('steps')} steps: val {metrics.get('val_bits_per_byte_before'):.4f} "
        f"-> {metrics.get('val_bits_per_byte_after'):.4f} bits/byte"
    ]


def describe_adapter_or_run(path: Path) -> str:
    """An adapter, and when ``path`` is the folder of the run that trained it, what the run did."""
    lines = [describe_adapter(path)]
    if path.is_dir():
        lines += run_line(path)
    return "\n".join(lines)


def header_shapes(path: Path) -> tuple[dict, Counter]:
    """A safetensors file's tensor shapes and its dtypes counted, read from its header alone."""
    shapes, dtypes = {}, Counter()
    with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():
            tensor = f.get_slice(name)
            shapes[name] = tuple(tensor.get_shape())
            dtypes[tensor.get_dtype()] += 1
    return shapes, dtypes


def describe_peft(path: Path) -> str:
    """A PEFT adapter folder (``export-peft``): its LoRA settings and its tensors counted."""
    config = read_json_object(path / PEFT_CONFIG, CheckpointError)
    shapes, dtypes = header_shapes(path / PEFT_WEIGHTS)
    modules = [name for name in shapes if name.endswith(".lora_A.weight")]
    settings = (
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "use_dora",
        "fan_in_fan_out",
        "base_model_name_or_path",
    )
    return "\n".join([
        f"PEFT adapter {path}",
        settings_line(config, settings),
        f"{len(modules)} adapted modules, {parameters_line(shapes, dtypes)}",
    ])  # fmt: skip


def describe_hf_checkpoint(path: Path) -> str:
    """A Hugging Face checkpoint folder (``merge --base smollm2``): its config and parameters counted."""
    config = read_json_object(path / HF_CONFIG, CheckpointError)
    shapes, dtypes = header_shapes(path / HF_WEIGHTS)
    keys = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "max_position_embeddings", "torch_dtype")  # fmt: skip
    return "\n".join([
        f"Hugging Face checkpoint {path} ({config.get('architectures')})",
        settings_line(config, keys),
        f"{len(shapes)} tensors, {parameters_line(shapes, dtypes)}",
    ])  # fmt: skip


def settings_line(config: dict, keys) -> str:
    """``key=value`` for each of ``keys`` in a JSON config, comma-separated (None where it is missing)."""
    return ", ".join(f"{key}={config.get(key)}" for key in keys)


def parameters_line(shapes: dict, dtypes: dict) -> str:
    """The parameters the tensors of ``shapes`` hold, and how many tensors each dtype holds."""
    counted = ", ".join(f"{n} {dtype}" for dtype, n in sorted(dtypes.items()))
    return f"{sum(math.prod(shape) for shape in shapes.values()):,} parameters ({counted})"


def describe_gguf(path: Path) -> str:
    """A llama GGUF file: its name, its config and its tensors by storage type."""
    from .gguf_file import llama_config, metadata_of, open_gguf

    reader = open_gguf(path)
    config = llama_config(metadata_of(reader))
    kinds = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    values = sum(int(tensor.n_elements) for tensor in reader.tensors)
    return "\n".join([
        f"GGUF file {path} ({path.stat().st_size:,} bytes): {config['name']}",
        f"config: {config}",
        f"{len(reader.tensors)} tensors, {values:,} parameters "
        f"({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))})",
    ])  # fmt: skip


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def is_adapter(path: Path) -> bool:
    weights_names = (ADAPTER_WEIGHTS, previous_path(ADAPTER_WEIGHTS).name)  # a run keeps the one before too
    return (path / ADAPTER_WEIGHTS).is_file() or path.name in weights_names


def is_peft(path: Path) -> bool:
    return (path / PEFT_WEIGHTS).is_file()


def is_hf_checkpoint(path: Path) -> bool:
    return (path / HF_CONFIG).is_file() and (path / HF_WEIGHTS).is_file()


ARTIFACTS = (  # (is it this kind?, its describer), asked in order; anything else is a checkpoint
    (is_gguf, describe_gguf),
    (is_adapter, describe_adapter_or_run),
    (is_peft, describe_peft),
    (is_hf_checkpoint, describe_hf_checkpoint),
)


def describe(path) -> str:
    """What ``minilora info PATH`` prints: ``path`` described by the describer of its kind (ARTIFACTS)."""
    path = Path(path)
    for is_kind, describe_kind in ARTIFACTS:
        if is_kind(path):
            return describe_kind(path)
    return describe_checkpoint(path)
