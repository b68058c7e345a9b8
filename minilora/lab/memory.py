"""The memory ledger: where the bytes of a training step go, for full fine-tuning and for LoRA.

A training step holds five kinds of arrays at its peak:

    weights          every parameter, frozen or not                         (the same in both modes)
    gradients        one gradient per trainable parameter                   (LoRA: the adapter's only)
    optimizer_state  AdamW's exp_avg and exp_avg_sq: 2 per trainable number (LoRA: the adapter's only)
    activations      what the forward pass keeps for the backward: every layer's cache, the logits
                     and the batch                                          (about the same in both modes)
    workspace        the temporaries alive at the backward's peak, on top of all the above

LoRA shrinks the gradient and optimiser lines to almost nothing; it does not shrink the activations,
which for B T tokens grow as B T C per block (and B H T^2 for the attention probabilities), so on the
larger presets activations are most of the memory of either mode. That is the lesson of this ledger.

The activation line is exact: it counts, array by array, what the caches of ``minilora.model``,
``minilora.lora.layer`` and ``minilora.layers`` hold (``cached_array_bytes`` measures a real cache, and the
tests check that the two agree to the byte). The workspace is an estimate read off the backward code
(see ``workspace_bytes``), to be kept in step with that code; ``tracemalloc`` puts the whole step within
a few percent of the ledger, and a test checks it. Everything is float32 by
default (4 bytes per number); token ids are int64.

What the ledger leaves out: the interpreter, NumPy, the BLAS library and its thread buffers, and the
allocator's slack. Those are why a process's peak resident set (RSS) is larger than the ledger's total;
``minilora bench`` reports both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..config import GPTConfig, get_preset
from ..lora.config import LoraConfig, select_target_modules
from ..model import parameter_shapes

INDEX_BYTES = 8  # token ids are int64
ADAM_BUFFERS = 2  # exp_avg and exp_avg_sq


@dataclass(frozen=True)
class MemoryLedger:
    """Bytes of one training step at its peak, by kind; see the module docstring."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations + self.workspace

    @property
    def per_step(self) -> int:
        """What a step allocates and frees again (activations, gradients, workspace): its traced peak."""
        return self.gradients + self.activations + self.workspace

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def trainable_count(config: GPTConfig, lora_config: LoraConfig | None) -> int:
    """Full fine-tuning trains every parameter; LoRA trains r (C_in + C_out) per adapted module."""
    if lora_config is None:
        return sum(math.prod(shape) for shape in parameter_shapes(config).values())
    if lora_config.bias != "none":
        raise ValueError("the ledger covers LoRA with bias='none' (the bench's setting)")
    modules = select_target_modules(lora_config, config)
    return sum(lora_config.r * (C_in + C_out) for C_in, C_out in modules.values())


def parameter_count(config: GPTConfig, lora_config: LoraConfig | None) -> int:
    """Every number the model holds: the base, plus the adapter with LoRA."""
    base = sum(math.prod(shape) for shape in parameter_shapes(config).values())
    return base if lora_config is None else base + trainable_count(config, lora_config)


def activation_bytes(config: GPTConfig, batch_size: int, seq_len: int | None = None,
                     lora_config: LoraConfig | None = None, itemsize: int = 4) -> int:
    """Bytes the forward pass keeps for the backward, exactly as minilora's caches hold them.

    Per block, with N = B T rows, in numbers (units of ``itemsize``):

        ln_1, ln_2      xhat (N, C) and rstd (N, 1) each                        2 (N C + N)
        attn.c_attn     its input, the ln_1 output (N, C)                       N C
        attention       qkv (N, 3C) (k and v are views of it), scaled q (N, C),
                        the probabilities (B, H, T, T), the merged heads (N, C)  5 N C + B H T^2
        mlp.c_fc        its input, the ln_2 output (N, C)                       N C
        gelu            its input (N, 4C) and tanh(u) (N, 4C)                   8 N C
        mlp.c_proj      its input, the gelu output (N, 4C)                      4 N C
                                                                  total         21 N C + 2 N + B H T^2

    each adapted module adds its low-rank activation h (N, r) (and with lora_dropout its masked input
    and mask, 2 N C_in); dropout (config.dropout > 0) adds one (B, H, T, T) and two (N, C) masks per
    block. On top: ln_f's xhat, rstd and output, the embedding-dropout mask if any, the logits (N, V)
    and the cross-entropy's probabilities (N, V); and the batch itself, idx and targets, in int64.
    """
    B, T = batch_size, config.block_size if seq_len is None else seq_len
    N, C, H, V = B * T, config.n_embd, config.n_head, config.vocab_size
    per_block = 21 * N * C + 2 * N + B * H * T * T
    if config.dropout > 0:
        per_block += B * H * T * T + 2 * N * C
    numbers = config.n_layer * per_block + 2 * N * C + N + 2 * N * V  # ln_f (xhat, rstd, output), logits, probs
    if config.dropout > 0:
        numbers += N * C
    if lora_config is not None:
        for C_in, _ in select_target_modules(lora_config, config).values():
            numbers += N * lora_config.r + (2 * N * C_in if lora_config.lora_dropout > 0 else 0)
    return numbers * itemsize + 2 * N * INDEX_BYTES


def workspace_bytes(config: GPTConfig, batch_size: int, seq_len: int | None = None, itemsize: int = 4) -> int:
    """The temporaries alive at the backward's peak, on top of the caches and the gradients.

    The peak comes during a block's attention backward, read off ``GPT._block_backward`` and
    ``attention_backward``:

    - dlogits (N, V), alive for the whole backward;
    - the block's gradients so far, still held by ``_block_backward``'s locals: dg and df (N, 4C)
      each, and the incoming dx, dh, the new dx and da (N, C) each: 12 N C;
    - inside the attention backward: datt and ds (B, H, T, T) each (NumPy reuses the temporary of
      ``datt - sum(...)`` for ds), and dv, dq, dk (N, C) each and dqkv (N, 3C): 2 B H T^2 + 6 N C.

    GELU's backward, the other candidate, holds dg, du/dx and its result, (N, 4C) each, next to dx:
    13 N C, always less. Total: 2 B H T^2 + 18 N C + N V numbers.
    """
    B, T = batch_size, config.block_size if seq_len is None else seq_len
    N, C, H, V = B * T, config.n_embd, config.n_head, config.vocab_size
    return (2 * B * H * T * T + 18 * N * C + N * V) * itemsize


def memory_ledger(config: GPTConfig, batch_size: int, seq_len: int | None = None,
                  lora_config: LoraConfig | None = None, dtype=np.float32) -> MemoryLedger:
    """The ledger of one AdamW training step; ``lora_config=None`` is full fine-tuning.

    >>> from minilora.config import get_preset
    >>> ledger = memory_ledger(get_preset("medium"), 16, lora_config=LoraConfig(r=8, target_modules=("c_attn", "attn.c_proj")))
    >>> ledger.optimizer_state == 2 * 110_592 * 4    # two Adam buffers per adapter number
    True
    """
    itemsize = np.dtype(dtype).itemsize
    trainable = trainable_count(config, lora_config)
    return MemoryLedger(
        weights=parameter_count(config, lora_config) * itemsize,
        gradients=trainable * itemsize,
        optimizer_state=ADAM_BUFFERS * trainable * itemsize,
        activations=activation_bytes(config, batch_size, seq_len, lora_config, itemsize),
        workspace=workspace_bytes(config, batch_size, seq_len, itemsize),
    )


def ledger_table(batch_sizes: dict, lora_config: LoraConfig, dtype=np.float32) -> list[dict]:
    """One row per preset and mode (full, LoRA): the ledger's lines in bytes, for tables and plots.

    ``batch_sizes`` maps preset names to the batch size used, e.g. bench.BENCH_BATCH_SIZES.
    """
    rows = []
    for preset, batch_size in batch_sizes.items():
        config = get_preset(preset)
        for mode, lora in (("full", None), ("lora", lora_config)):
            ledger = memory_ledger(config, batch_size, lora_config=lora, dtype=dtype)
            rows.append({"preset": preset, "mode": mode, "batch_size": batch_size, **ledger.to_dict()})
    return rows


def cached_array_bytes(obj, exclude=()) -> int:
    """Bytes of the distinct arrays reachable from ``obj`` (nested tuples, lists, dicts, NamedTuples).

    Views count once, as the array that owns their memory; arrays whose memory belongs to one in
    ``exclude`` (the model's parameters, which caches reference) are not counted. This is the
    measured side of ``activation_bytes``.
    """
    def owner(array):
        while getattr(array, "base", None) is not None and hasattr(array.base, "nbytes"):
            array = array.base
        return array

    excluded = {id(owner(array)) for array in exclude}
    found = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if hasattr(item, "nbytes") and hasattr(item, "shape"):  # a NumPy or CuPy array
            root = owner(item)
            if id(root) not in excluded:
                found[id(root)] = int(root.nbytes)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return sum(found.values())


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the rest of minilora reports sizes)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
