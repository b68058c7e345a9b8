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

import math

from ...llama import LlamaConfig
from ...lora.accounting import lora_trainable_count
from ...lora.config import LoraConfig

# SmolLM2-135M's shape (the GGUF file's header, io/llama_gguf.py, gives the same numbers)
SMOLLM2_SHAPE = LlamaConfig(
    n_layer=30, n_head=9, n_kv_head=3, n_embd=576, ffn_hidden=1536, vocab_size=49152, block_size=2048
)


def full_trainable_count(model_config) -> int:
    """Every weight the config's family holds (a tied head counted once): what a full fine-tune trains."""
    return sum(math.prod(shape) for shape in model_config.parameter_shapes().values())


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
