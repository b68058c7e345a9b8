"""Counting what LoRA trains: PEFT's one-line summary and a per-module table.

An adapted (C_in x C_out) weight gets lora_A (r x C_in) and lora_B (C_out x r): r (C_in + C_out)
trainable numbers instead of C_in C_out. For GPT-2 small's c_attn (768 x 2304) at r = 8 that is
24,576 instead of 1,769,472, 1.4% of the matrix. These counts need only the configs (any family's:
each states its parameter shapes), so they work for shapes too large to build here.
"""

from __future__ import annotations

from .config import LoraConfig, select_target_modules
from .init import trainable_biases


def lora_parameter_table(lora_config: LoraConfig, model_config) -> list[dict]:
    """One row per adapted module: its name, weight shape, rank and adapter parameter count."""
    r = lora_config.r
    return [
        {"module": name, "weight_shape": (C_in, C_out), "r": r, "adapter_params": r * (C_in + C_out)}
        for name, (C_in, C_out) in select_target_modules(lora_config, model_config).items()
    ]


def lora_trainable_count(lora_config: LoraConfig, model_config) -> int:
    """lora_A and lora_B of every adapted module, DoRA's magnitudes (C_out each), the biases it trains."""
    count = sum(row["adapter_params"] for row in lora_parameter_table(lora_config, model_config))
    shapes = model_config.parameter_shapes()
    modules = select_target_modules(lora_config, model_config)
    if lora_config.use_dora:
        count += sum(C_out for _, C_out in modules.values())
    return count + sum(shapes[name][0] for name in trainable_biases(lora_config, modules, shapes))


def summary_line(trainable: int, total: int) -> str:
    """PEFT's print_trainable_parameters format."""
    share = 100 * trainable / total
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"


def model_summary_line(model) -> str:
    """The summary of a built model (with adapters or without): everything it holds counts as a parameter."""
    return summary_line(model.num_parameters(trainable_only=True), model.num_parameters())


def format_table(rows: list[dict]) -> str:
    """The per-module table as aligned text, with a total line."""
    header = f"{'module':<32} {'weight shape':>14} {'r':>4} {'adapter params':>15}"
    lines = [header, "-" * len(header)]
    for row in rows:
        shape = "{} x {}".format(*row["weight_shape"])
        lines.append(f"{row['module']:<32} {shape:>14} {row['r']:>4} {row['adapter_params']:>15,}")
    lines.append(f"{'total':<32} {'':>14} {'':>4} {sum(row['adapter_params'] for row in rows):>15,}")
    return "\n".join(lines)
