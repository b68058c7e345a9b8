"""Sizes that cannot fit, refused before anything is allocated, in one line naming the flag.

NumPy raises MemoryError only when an allocation fails, which for a huge ``--batch-size``,
``--n-embd`` or ``--max-new-tokens`` can come many seconds into a run, as a traceback. A job first
adds up a lower bound on what it will hold and refuses, naming the flag that asked for the most,
what exceeds the memory the operating system says is available (``/proc/meminfo``'s MemAvailable,
else the free physical pages; where neither is known nothing is refused).

The bound counts only what is certain: the weights a job makes, their gradients and AdamW's two
buffers per trainable number, the batch as ``get_batch`` builds it (its positions, inputs and
targets, int64 each), and each block's input, which the backward needs even with gradient
checkpointing. The memory ledger (lab/memory.py) measures a step exactly, by running one, which is
what a size that cannot fit must never do; its total is above this bound (the tests check it).
On a GPU the weights are drawn and the batches gathered on the host first, so those are counted
against the host's memory and the rest is left to the device. A size that passes may still not
fit: the command line then reports the MemoryError in one line (cli/__init__.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..lab.memory import ADAM_BUFFERS, format_bytes

MEMINFO = "/proc/meminfo"
FLOAT32_BYTES = 4
INDEX_BYTES = 8  # int64, as get_batch and generate_ids hold token ids and positions
BATCH_ARRAYS = 3  # get_batch's (B, T) positions, inputs and targets


class InsufficientMemory(ValueError):
    """A size asked for cannot fit in the memory available; the message names the flag and both sizes."""


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a job will hold at least, what asked for them (naming its flag) and how to ask for less."""

    asked: str  # "--batch-size 64"
    held: str  # what the bytes hold: "the batch, each block's input"
    bytes: int
    remedy: str  # "lower --batch-size"


@dataclass(frozen=True)
class TrainedModel:
    """What a training job's model asks of memory, and how the message names it."""

    label: str  # "the model of --n-layer 4, --n-embd 128"
    remedy: str  # how to ask for less: "lower --n-layer or --n-embd"
    trainable: int  # parameters with a gradient and AdamW's buffers
    new_weights: int  # parameters the job allocates itself (0 for a loaded base)
    itemsize: int  # bytes per number of the activations


def available_memory() -> int | None:
    """Bytes a new allocation can have: MemAvailable (Linux), else the free physical pages, else None."""
    try:
        with open(MEMINFO) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name (macOS)
        return None


def check_memory(needs: list[MemoryNeed]) -> None:
    """InsufficientMemory, naming the largest need's flag, if ``needs`` add up to more than is available."""
    available = available_memory()
    total = sum(need.bytes for need in needs)
    if available is None or total <= available:
        return
    largest = max(needs, key=lambda need: need.bytes)
    raise InsufficientMemory(
        f"{largest.asked} needs at least {format_bytes(total)} of memory ({largest.held}: "
        f"{format_bytes(largest.bytes)}), but {format_bytes(available)} is available: {largest.remedy}"
    )


def parameter_count(config) -> int:
    """The parameters of a model of ``config``, from the config's own shapes at one and two blocks.

    Every block has the same shapes, so the count is the one-block model's plus (n_layer - 1)
    blocks: no table of n_layer entries is built for a config whose n_layer is huge.
    """

    def count(n_layer: int) -> int:
        shapes = replace(config, n_layer=n_layer).parameter_shapes().values()
        return sum(_product(shape) for shape in shapes)

    one, two = count(1), count(2)
    return one + (config.n_layer - 1) * (two - one)


def _product(shape) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def training_needs(config, batch_size: int, model: TrainedModel, device: str) -> list[MemoryNeed]:
    """A lower bound on a training step's memory: the model's (weights made, gradients, AdamW) and the batch's.

    On a GPU only the weights drawn and the batches gathered on the host are counted (the host's
    memory is the one asked); the gradients, AdamW's buffers and the activations live on the device.
    """
    B, T = batch_size, config.block_size
    on_cpu = device == "cpu"
    optimizer = (1 + ADAM_BUFFERS) * model.trainable * FLOAT32_BYTES if on_cpu else 0
    activations = B * T * config.n_layer * config.n_embd * model.itemsize if on_cpu else 0
    return [
        MemoryNeed(
            f"{model.label} ({model.trainable:,} parameters trained)",
            "its weights, gradients and AdamW state" if on_cpu else "its weights",
            model.new_weights * FLOAT32_BYTES + optimizer,
            model.remedy,
        ),
        MemoryNeed(
            f"--batch-size {B}",
            "the batch, each block's input kept for the backward" if on_cpu else "the batch",
            BATCH_ARRAYS * B * T * INDEX_BYTES + activations,
            "lower --batch-size (--grad-accum trains on as many rows in smaller steps)",
        ),
    ]


def check_training_memory(config, batch_size: int, model: TrainedModel, device: str) -> None:
    """InsufficientMemory before a training job allocates, if its step surely cannot fit (training_needs)."""
    check_memory(training_needs(config, batch_size, model, device))


def check_generation_memory(max_new_tokens: int) -> None:
    """InsufficientMemory if the token buffer of ``max_new_tokens`` (int64 ids, and their text) cannot fit."""
    need = MemoryNeed(
        f"--max-new-tokens {max_new_tokens}",
        "the generated ids, 8 bytes each, and their text",
        max_new_tokens * (INDEX_BYTES + 1),
        "ask for fewer tokens",
    )
    check_memory([need])
