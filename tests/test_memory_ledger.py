"""The memory ledger (minilora.lab.memory) against what real steps hold.

Every check builds its own model with GPT-2's random initialisation (the ledger's probes use zeros)
and computes the expected numbers independently: from the arrays of a real forward, from tracemalloc
around a real step, or from the LoRA shapes r (C_in + C_out). Tiny and small configs only.
"""

import dataclasses
import doctest
import math
import tracemalloc
from typing import NamedTuple

import numpy as np
import pytest

from minilora.backend import device_rng
from minilora.config import GPTConfig, get_preset
from minilora.lab import memory
from minilora.lab.memory import (
    LedgerProbe,
    MemoryLedger,
    SegmentTracer,
    StepProbe,
    cached_array_bytes,
    ledger_probe,
    ledger_table,
    memory_ledger,
    probe_model,
    probe_step,
)
from minilora.layers import gelu_backward, gelu_forward
from minilora.lora.config import LoraConfig, select_target_modules
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params

TINY = get_preset("tiny")
SMALL = get_preset("small")
ATTN_LORA = LoraConfig(r=8, target_modules=("c_attn", "attn.c_proj"))
ATTENTION_HEAVY = GPTConfig(n_layer=2, n_head=8, n_embd=32, block_size=128)  # B H T^2 dominates


def fast_cpu_ops():
    """The fast path's CPU namespace, where this checkout has one (None: the reference alone)."""
    try:
        from minilora.fast.cpu.ops import CPU_OPS
    except ImportError:
        return None
    return CPU_OPS


OPS = [None] + ([fast_cpu_ops()] if fast_cpu_ops() is not None else [])


def build(config, lora_config=None, dtype=np.float32, seed=0):
    model = GPT(config, init_params(config, seed=seed, dtype=dtype))
    return model if lora_config is None else add_lora(model, lora_config, seed=seed)


def batch(config, B, T, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


def held_by_a_real_forward(config, lora_config, B, T, dtype=np.float32):
    """Bytes of what a real step keeps for its backward: the cache, the logits and the batch."""
    model = build(config, lora_config, dtype)
    idx, targets = batch(config, B, T)
    logits, _, cache = model.forward(idx, targets, dropout_rng=device_rng(np, 0, 1))
    weights = [*model.params.values(), *getattr(model, "base_params", {}).values()]
    return cached_array_bytes((cache, logits, idx, targets), exclude=weights)


def base_bytes(config, itemsize=4):
    return itemsize * sum(math.prod(shape) for shape in config.parameter_shapes().values())


def adapter_bytes(lora_config, config, itemsize=4):
    """r (C_in + C_out) numbers per adapted module: lora_A (r, C_in) and lora_B (C_out, r)."""
    modules = select_target_modules(lora_config, config)
    return itemsize * sum(lora_config.r * (C_in + C_out) for C_in, C_out in modules.values())


@pytest.mark.parametrize(
    "config, lora_config, T",
    [
        (TINY, None, 64),
        (TINY, LoraConfig(r=4, target_modules="all-linear"), 61),
        (get_preset("tiny", dropout=0.1), LoraConfig(r=4, target_modules=("c_attn",), lora_dropout=0.1), 64),
        (TINY, LoraConfig(r=4, target_modules=("c_attn", "mlp.c_fc"), use_dora=True), 32),
        (GPTConfig(n_layer=2, n_head=4, n_embd=16, block_size=32, bias=False), None, 32),
    ],
)
def test_ledger_activations_equal_the_bytes_a_real_forward_holds_at_batch_3(config, lora_config, T):
    ledger = memory_ledger(config, 3, T, lora_config)
    assert ledger.activations == held_by_a_real_forward(config, lora_config, 3, T)


@pytest.mark.parametrize("lora_config", [None, ATTN_LORA])
def test_activations_of_a_batch_are_the_batch_size_times_those_of_one_sequence(lora_config):
    """Every cached array has the batch as its leading axis: the B = 1 probe times 3 is B = 3, to the byte."""
    one, two = ledger_probe(SMALL, 100, lora_config).steps
    assert (one.batch_size, two.batch_size) == (1, 2)
    assert two.activations == 2 * one.activations
    assert 3 * one.activations == held_by_a_real_forward(SMALL, lora_config, 3, 100)


@pytest.mark.parametrize("ops", OPS, ids=lambda ops: "reference" if ops is None else ops.name)
@pytest.mark.parametrize(
    "config, lora_config",
    [
        (TINY, None),
        (TINY, ATTN_LORA),
        pytest.param(SMALL, None, marks=pytest.mark.slow),
        pytest.param(SMALL, ATTN_LORA, marks=pytest.mark.slow),
        (ATTENTION_HEAVY, ATTN_LORA),
    ],
)
def test_workspace_is_linear_in_the_batch_within_half_a_percent(config, lora_config, ops):
    """The segment lines through the B = 1 and B = 2 probes predict a measured B = 5 backward."""
    T = config.block_size
    measured = probe_step(probe_model(config, lora_config, ops=ops), 5, T).workspace
    predicted = memory_ledger(config, 5, T, lora_config, ops=ops).workspace
    assert abs(predicted / measured - 1) < 0.005, (predicted, measured)


def test_the_workspace_follows_the_highest_segment_line_not_the_line_through_two_peaks():
    """A flat segment (gradients, say) highest at B = 1, a steep one (attention) from B = 2 on."""

    def step(B):
        return StepProbe(B, activations=100 * B, gradients=300, segments=(("flat", 1000), ("steep", 600 * B)))

    probe = LedgerProbe(weights=1, gradients=300, optimizer_state=600, steps=(step(1), step(2)))
    assert [probe.workspace(B) for B in (1, 2, 16)] == [1000 - 300, 1200 - 300, 9600 - 300]
    assert [probe.peak_segment(B) for B in (1, 2, 16)] == ["flat", "steep", "steep"]
    assert probe.activations(16) == 1600
    renamed = StepProbe(2, 200, 300, (("other", 1000), ("steep", 1200)))  # unmatched: one line, two peaks
    assert LedgerProbe(1, 300, 600, (step(1), renamed)).workspace(16) == 1000 + 15 * 200 - 300


def test_the_segment_tracer_sees_the_same_peak_as_one_trace_of_the_whole_backward():
    model = build(SMALL, ATTN_LORA)
    idx, targets = batch(SMALL, 4, SMALL.block_size)
    _, _, cache = model.forward(idx, targets)
    tracemalloc.start()
    try:
        model.backward(cache)
        whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tracer = SegmentTracer()
    model.ops = tracer.wrap(model.ops)
    _, _, cache = model.forward(idx, targets)
    tracemalloc.start()
    try:
        model.backward(cache)
        tracer.mark("end")
    finally:
        tracemalloc.stop()
    segments = tracer.segments()
    assert len(segments) > 4 * SMALL.n_layer  # at least one boundary per layer call
    assert abs(max(peak for _, peak in segments) / whole - 1) < 1e-3, (segments, whole)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_gradient_and_optimizer_lines_are_the_parameter_bytes(dtype):
    itemsize = np.dtype(dtype).itemsize
    full = memory_ledger(TINY, 4, dtype=dtype)
    assert full.weights == full.gradients == base_bytes(TINY, itemsize)
    assert full.optimizer_state == 2 * base_bytes(TINY, itemsize)
    for lora_config in (
        ATTN_LORA,
        LoraConfig(r=4, target_modules="all-linear"),
        LoraConfig(r=2, target_modules=("mlp.c_proj",), layers_to_transform=(1,)),
    ):
        lora = memory_ledger(TINY, 4, lora_config=lora_config, dtype=dtype)
        adapter = adapter_bytes(lora_config, TINY, itemsize)
        assert lora.gradients == adapter and lora.optimizer_state == 2 * adapter  # Adam: 2 x trainable
        assert lora.weights == base_bytes(TINY, itemsize) + adapter


def test_lora_adds_its_low_rank_activation_and_float64_doubles_all_but_the_token_ids():
    B, T = 4, SMALL.block_size
    full, lora = memory_ledger(SMALL, B), memory_ledger(SMALL, B, lora_config=ATTN_LORA)
    n_adapted = 2 * SMALL.n_layer
    added = 4 * B * T * ATTN_LORA.r * n_adapted  # h = x A^T, (B, T, r), per adapted module
    # the frozen MLP's inputs are let go (only dW reads them, and no other cache holds them):
    # c_fc's (B, T, C), the LayerNorm's output, and c_proj's (B, T, 4C), GELU's output
    freed = 4 * B * T * 5 * SMALL.n_embd * SMALL.n_layer
    assert lora.activations - full.activations == added - freed
    double = memory_ledger(SMALL, B, dtype=np.float64)
    # idx, targets and the loss's copy of the targets (IGNORE replaced, layers/cross_entropy.py) stay int64
    assert double.activations == 2 * full.activations - 3 * B * T * 8


@pytest.mark.parametrize("ops", OPS, ids=lambda ops: "reference" if ops is None else ops.name)
@pytest.mark.parametrize(
    "config, lora_config, B",
    [
        (TINY, None, 2),
        (TINY, ATTN_LORA, 2),
        (TINY, ATTN_LORA, 16),
        (ATTENTION_HEAVY, None, 4),
    ],
)
def test_per_step_is_within_one_percent_of_the_traced_peak_of_a_real_step(config, lora_config, B, ops):
    """tracemalloc around forward and backward, as the training step holds them (logits bound until done)."""
    ledger = memory_ledger(config, B, lora_config=lora_config, ops=ops)
    model = build(config, lora_config)
    if ops is not None:
        model.ops = ops
    idx, targets = batch(config, B, config.block_size)
    tracemalloc.start()
    try:
        _, loss, cache = model.forward(idx, targets)
        grads = model.backward(cache)
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.isfinite(float(loss)) and grads
    assert 0.99 < traced / ledger.per_step < 1.01, (traced, ledger.per_step)


class InputOnlyGeluCache(NamedTuple):
    x: object  # the input only: tanh(u) is recomputed in the backward, as the GPU's GELU does


def input_only_gelu_forward(x):
    return gelu_forward(x)[0], InputOnlyGeluCache(x)


def input_only_gelu_backward(dout, cache):
    return gelu_backward(dout, gelu_forward(cache.x)[1])


def test_the_ledger_counts_the_caches_of_the_ops_it_is_given():
    if not hasattr(build(TINY), "ops"):
        pytest.skip("this GPT has no ops namespace yet")
    reference = build(TINY).ops
    lean = dataclasses.replace(
        reference,
        name="input-only gelu",
        gelu_forward=input_only_gelu_forward,
        gelu_backward=input_only_gelu_backward,
    )
    B, T = 3, 64
    x = np.zeros((B, T, 4 * TINY.n_embd), dtype=np.float32)  # the GELU's input, mlp.c_fc's output
    saved_per_block = cached_array_bytes(gelu_forward(x)[1]) - x.nbytes
    assert saved_per_block > 0
    assert (
        memory_ledger(TINY, B, T).activations - memory_ledger(TINY, B, T, ops=lean).activations
        == TINY.n_layer * saved_per_block
    )


def test_cached_array_bytes_walks_named_tuples_dataclasses_lists_and_dicts_and_ignores_the_rest():
    class Pair(NamedTuple):
        a: object
        b: object

    @dataclasses.dataclass
    class Holder:
        arrays: list
        note: str

    @dataclasses.dataclass(frozen=True)
    class Functions:  # like a model's ops namespace: functions are not arrays
        forward: object
        backward: object

    owner = np.zeros((4, 8), dtype=np.float32)  # 128 bytes
    other = np.zeros(10, dtype=np.float64)  # 80 bytes
    param = np.ones(1000, dtype=np.float32)
    nested = {
        "pair": Pair(owner[1:], owner.T),
        "holder": Holder([other, other[::2], param[:3]], "x"),
        "ops": Functions(np.exp, lambda x: x),
        "types": [np.float32, np, 3.0, None],
    }
    nested["self"] = nested  # a cycle
    assert cached_array_bytes(nested, exclude=[param]) == 128 + 80
    assert cached_array_bytes(nested) == 128 + 80 + 4000
    assert cached_array_bytes(Functions(np.zeros, np.ones)) == 0


def test_ledger_table_rows_are_the_ledgers_of_each_preset_and_mode():
    rows = ledger_table({"tiny": 16, "small": 8}, ATTN_LORA)
    assert [(row["preset"], row["mode"], row["batch_size"]) for row in rows] == [
        ("tiny", "full", 16),
        ("tiny", "lora", 16),
        ("small", "full", 8),
        ("small", "lora", 8),
    ]
    assert rows[3] == {
        "preset": "small",
        "mode": "lora",
        "batch_size": 8,
        **memory_ledger(SMALL, 8, lora_config=ATTN_LORA).to_dict(),
    }
    ledger = MemoryLedger(**{key: rows[0][key] for key in memory.MemoryLedger.__dataclass_fields__})
    assert rows[0]["total"] == ledger.total == ledger.per_step + ledger.weights + ledger.optimizer_state


def test_the_docstring_example_holds():
    """It uses small, r = 8 on c_attn and attn.c_proj: 4 blocks x 8 x ((128 + 384) + (128 + 128)) numbers."""
    assert adapter_bytes(ATTN_LORA, SMALL) == 4 * 8 * ((128 + 384) + (128 + 128)) * 4
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(memory.memory_ledger, "memory_ledger", globs=vars(memory)):
        runner.run(test)
    assert tuple(runner.summarize(verbose=False)) == (0, 6)  # (failed, attempted)


def test_a_probe_refuses_to_run_inside_an_outer_trace():
    tracemalloc.start()
    try:
        with pytest.raises(RuntimeError, match="tracemalloc"):
            memory_ledger(TINY, 2, 7)  # T = 7: a probe no other test has asked for
    finally:
        tracemalloc.stop()
    assert memory_ledger(TINY, 2, 7).activations > 0


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="batch_size"):
        memory_ledger(TINY, 0)
