"""What a data-parallel step sends: the trainable gradients, counted from the configs alone.

A data-parallel step exchanges one number per trainable parameter (plus the loss): the frozen base
never moves, since every rank holds the same copy and none of them changes it. So the traffic of a
step is the trainable count times the bytes per number, and LoRA's is small for the reason its
optimiser state is: r (C_in + C_out) numbers per adapted matrix instead of C_in C_out.

``step_bytes`` is the buffer one rank contributes per step. How much crosses the wires depends on the
algorithm: the MPI step's Allgather sends it to each of the N - 1 others; a ring all-reduce sends
about 2 (N - 1) / N of it per rank. Either way it is proportional to the buffer, so the ratio of
LoRA's to a full fine-tune's holds for any algorithm.
"""

from __future__ import annotations

from ...llama import LlamaConfig, llama_parameter_shapes
from ...lora.config import LoraConfig, select_target_modules
from ...model import parameter_shapes

# SmolLM2-135M's shape (the GGUF file's header, io/llama_gguf.py, gives the same numbers)
SMOLLM2_SHAPE = LlamaConfig(
    n_layer=30, n_head=9, n_kv_head=3, n_embd=576, ffn_hidden=1536, vocab_size=49152, block_size=2048
)


def full_trainable_count(model_config) -> int:
    """Every weight of a GPT or a Llama (a tied head counted once): what a full fine-tune trains."""
    shapes = (
        llama_parameter_shapes(model_config)
        if isinstance(model_config, LlamaConfig)
        else parameter_shapes(model_config)
    )
    count = 0
    for shape in shapes.values():
        size = 1
        for dim in shape:
            size *= dim
        count += size
    return count


def lora_trainable_count(lora_config: LoraConfig, model_config) -> int:
    """lora_A (C_in, r) and lora_B (r, C_out) of every adapted matrix: r (C_in + C_out) each (no biases)."""
    if lora_config.bias != "none":
        raise ValueError("lora_trainable_count counts adapters without trained biases (bias='none')")
    return sum(
        lora_config.r * (C_in + C_out)
        for C_in, C_out in select_target_modules(lora_config, model_config).values()
    )


def step_bytes(trainable: int, itemsize: int = 4) -> int:
    """One rank's buffer per step: every trainable gradient and the loss, ``itemsize`` bytes each."""
    return (trainable + 1) * itemsize


def traffic_table(model_config, lora_config: LoraConfig, itemsize: int = 4) -> dict:
    """Bytes per step for LoRA and for a full fine-tune of ``model_config``, and LoRA's share."""
    lora, full = lora_trainable_count(lora_config, model_config), full_trainable_count(model_config)
    lora_bytes, full_bytes = step_bytes(lora, itemsize), step_bytes(full, itemsize)
    return {
        "lora_trainable": lora,
        "full_trainable": full,
        "lora_bytes": lora_bytes,
        "full_bytes": full_bytes,
        "lora_share": lora_bytes / full_bytes,
    }
