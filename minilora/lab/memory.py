"""The memory ledger: where the bytes of a training step go, for full fine-tuning and for LoRA.

A training step holds five kinds of arrays at its peak, which comes during the backward pass:

    weights          every parameter, frozen or not                         (the same in both modes)
    gradients        one gradient per trainable parameter                   (LoRA: the adapter's only)
    optimizer_state  AdamW's exp_avg and exp_avg_sq: 2 per trainable number (LoRA: the adapter's only)
    activations      what the forward keeps for the backward: every layer's cache, plus the logits
                     and the batch                                          (about the same in both modes)
    workspace        the temporaries alive at the backward's peak, on top of all the above

LoRA shrinks the gradient and optimiser lines to almost nothing; it does not shrink the activations,
which for B T tokens grow as B T C per block (and B H T^2 for the attention probabilities), so on the
larger presets activations are most of the memory of either mode. That is the lesson of this ledger.

How the ledger is made: it does not add up a formula, it measures the code. It builds the model for
the config (a ``GPT``, or a LoRA model from ``add_lora``) with all-zero parameters (only shapes matter,
and ``np.zeros`` leaves its pages untouched), runs one real forward pass with targets, as training
does, and asks what it holds:

- weights, gradients, optimizer state: the bytes of the built model's ``params`` (with LoRA, also its
  ``base_params``: PiSSA and trained biases keep the base's own arrays beside theirs) and of its
  ``trainable_names``, times 1 for the gradients and 2 for AdamW. Exact, and independent of B.
- activations: ``cached_array_bytes`` of the returned cache, the logits and the batch: every distinct
  array they reach (views count once, as the array owning their memory; the parameters the caches
  point at are excluded). The logits are not in the cache but the step keeps them until the backward
  is done (``_, loss, cache = model.forward(...)`` binds them to a local), so they are counted; so is
  the batch, idx and targets, in int64.
- workspace: ``tracemalloc`` around the probe's ``model.backward(cache)``. NumPy reports every array
  it allocates to it, so the traced peak during the backward, less what was traced at its start, is
  what the backward adds at its worst moment; less the gradients it returns, that is the workspace.

Why a probe at a small batch tells the story of every batch: every array a cache holds has the
batch as its leading axis, (B, T, C) or (B, H, T, T), so the activations at batch B are exactly B
times those at B = 1 (the tests check it to the byte). The ledger probes twice, at B = 1 and B = 2,
and extends the line through the two points, f(B) = f(1) + (B - 1) (f(2) - f(1)), which is exact for
anything of the form a + b B: here b = f(1) and a = 0, and a cached array without a batch axis, should
a future cache hold one, would land in a.

The workspace needs one more idea. The bytes alive at any one moment of the backward are a + b B
(temporaries shaped (B, ...), plus gradients and a few parameter-shaped temporaries that do not
grow with B), but the peak is the highest of all the moments, and which moment is highest can change
with B: at B = 1 on tiny the peak is at the end of the backward, where every gradient is alive; from
B = 2 on it is inside an attention backward. One line through two peaks would then be wrong at B = 16.
So the probe cuts the backward into segments, one per layer-function call: it wraps each function
of ``model.ops`` so that tracemalloc's peak is read and reset (``tracemalloc.reset_peak``) before and
after the call. Each segment gets its own line through B = 1 and 2, and the workspace at B is the
highest line at B, less the gradients (a model without an ``ops`` dataclass is one segment).

Probes run on the CPU with NumPy, by default with the model's reference layer functions; ``ops=``
gives the model another namespace of layer functions (``model.ops``) so a fast path's caches are
ledgered instead (a GPU namespace's caches differ, e.g. no tanh in GELU's, a log-sum-exp in place of
the attention probabilities, but the GPU cannot be traced: its workspace line would be the CPU's).
Probes are remembered per (config, T, LoRA config, dtype, ops) within a process. They are instant at
tiny and small, under a second at medium; at gpt2s (T = 1024) the B = 2 probe holds about 3 GB, and
``ledger_table`` over the bench presets takes about a minute on one core.

What the ledger leaves out: the interpreter, NumPy and the BLAS library with its thread buffers, the
allocator's slack and pages it keeps, the next step's arrays overlapping the last one's (the training
loop keeps the previous step's cache until the next forward returns), and the sharded CPU step's one
gradient dict per shard. Those are why a process's peak resident set (RSS) is larger than the
ledger's total; ``minilora bench`` reports both.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from dataclasses import asdict, dataclass

import numpy as np

from ..backend import host_rng
from ..config import GPTConfig, get_preset
from ..lora.config import LoraConfig
from ..lora.model import add_lora
from ..model import GPT

ADAM_BUFFERS = 2  # exp_avg and exp_avg_sq
PROBE_BATCH_SIZES = (1, 2)  # the two points the activation and workspace lines are drawn through


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


@dataclass(frozen=True)
class StepProbe:
    """What one real forward and backward at batch size B held, in bytes."""

    batch_size: int
    activations: int  # the cache, the logits and the batch, as distinct arrays
    gradients: int  # the gradients the backward returned
    segments: tuple  # (label, traced peak above the backward's start) per segment, in order

    @property
    def workspace(self) -> int:
        """The backward's traced peak, less the gradients it returned."""
        return max(0, max(peak for _, peak in self.segments) - self.gradients)


def _line(B_1: int, f_1: int, B_2: int, f_2: int, B: int) -> int:
    """f(B) on the line through (B_1, f_1) and (B_2, f_2), in whole bytes."""
    return f_1 + (f_2 - f_1) * (B - B_1) // (B_2 - B_1)


@dataclass(frozen=True)
class LedgerProbe:
    """The measurements a ledger is read from: the B-independent lines and two step probes."""

    weights: int
    gradients: int
    optimizer_state: int
    steps: tuple  # StepProbe at B = 1 and B = 2

    def activations(self, batch_size: int) -> int:
        first, second = self.steps
        return _line(first.batch_size, first.activations, second.batch_size, second.activations, batch_size)

    def segment_peaks(self, batch_size: int) -> list[tuple[str, int]]:
        """Every segment's (label, traced peak) at B, each on its own line through the two probes."""
        first, second = self.steps
        if [label for label, _ in first.segments] != [label for label, _ in second.segments]:
            # the two backwards called different functions: only their peaks can be matched
            peak_1, peak_2 = (max(peak for _, peak in step.segments) for step in self.steps)
            return [("backward", _line(first.batch_size, peak_1, second.batch_size, peak_2, batch_size))]
        return [
            (label, _line(first.batch_size, f_1, second.batch_size, f_2, batch_size))
            for (label, f_1), (_, f_2) in zip(first.segments, second.segments, strict=True)
        ]

    def peak_segment(self, batch_size: int) -> str:
        """Where the backward's peak falls at B: the label of the segment with the highest line."""
        return max(self.segment_peaks(batch_size), key=lambda segment: segment[1])[0]

    def workspace(self, batch_size: int) -> int:
        peak = max(bytes_ for _, bytes_ in self.segment_peaks(batch_size))
        return max(0, peak - self.steps[0].gradients)

    def ledger(self, batch_size: int) -> MemoryLedger:
        return MemoryLedger(
            weights=self.weights,
            gradients=self.gradients,
            optimizer_state=self.optimizer_state,
            activations=self.activations(batch_size),
            workspace=self.workspace(batch_size),
        )


class SegmentTracer:
    """Reads and resets tracemalloc's peak around every call of a namespace's functions.

    ``wrap(ops)`` returns a copy of a dataclass namespace whose functions mark a segment boundary
    before and after they run (only while tracemalloc traces, so the forward runs unmarked);
    ``segments()`` lists (label, peak traced since the previous boundary). The marks write into
    slots allocated up front, so the tracer adds nothing of its own to what it traces.
    """

    def __init__(self, capacity: int = 4096):
        self.labels = [None] * capacity  # the label of each mark (strings made once, in wrap)
        self.peaks = np.zeros(capacity, dtype=np.int64)
        self.count = 0

    def mark(self, label: str) -> None:
        if not tracemalloc.is_tracing():
            return
        if self.count == len(self.labels):  # more marks than slots: grow (this allocation is traced)
            self.labels.extend([None] * len(self.labels))
            self.peaks = np.concatenate([self.peaks, np.zeros_like(self.peaks)])
        self.labels[self.count] = label
        self.peaks[self.count] = tracemalloc.get_traced_memory()[1]
        self.count += 1
        tracemalloc.reset_peak()  # the next segment's peak starts at what is alive now

    def segments(self) -> list[tuple[str, int]]:
        return [(self.labels[i], int(self.peaks[i])) for i in range(self.count)]

    def wrap(self, ops):
        if not dataclasses.is_dataclass(ops) or isinstance(ops, type):
            return ops  # not a namespace we can copy: the backward stays one segment

        def traced(name, function):
            before = f"before {name}"

            def call(*args, **kwargs):
                self.mark(before)
                out = function(*args, **kwargs)
                self.mark(name)
                return out

            return call

        return dataclasses.replace(
            ops,
            **{
                field.name: traced(field.name, getattr(ops, field.name))
                for field in dataclasses.fields(ops)
                if field.init and callable(getattr(ops, field.name))
            },
        )


def probe_model(config: GPTConfig, lora_config: LoraConfig | None = None, dtype=np.float32, ops=None) -> GPT:
    """The model a step of this config trains, with all-zero parameters of ``dtype`` on the CPU.

    With ``lora_config`` it is ``add_lora``'s model; ``ops``, if given, becomes ``model.ops``
    (a model that has no ``ops`` of its own ignores it).
    """
    params = {name: np.zeros(shape, dtype=dtype) for name, shape in config.parameter_shapes().items()}
    model = GPT(config, params)
    if lora_config is not None:
        model = add_lora(model, lora_config)
    if ops is not None:
        model.ops = ops  # set on the model that runs: add_lora builds a new one
    return model


def weight_arrays(model) -> list:
    """Every parameter array the model keeps: ``params``, and a LoRA model's ``base_params`` beside them."""
    return [value for weights in model.weight_dicts() for value in weights.values()]


def probe_step(model, batch_size: int, seq_len: int) -> StepProbe:
    """One real forward (with targets) and backward at (B, T) = (batch_size, seq_len), measured.

    activations: ``cached_array_bytes`` of (cache, logits, idx, targets), the parameters excluded.
    segments: tracemalloc's peak above the backward's start, per layer-function call (see
    ``SegmentTracer``). The arrays die with this function, before the next probe.
    """
    if tracemalloc.is_tracing():
        raise RuntimeError(
            "the memory ledger traces a backward pass with tracemalloc: build the ledger "
            "before tracemalloc.start() or after tracemalloc.stop(), not inside"
        )
    tracer = SegmentTracer()
    ops = model.ops
    model.ops = tracer.wrap(ops)
    idx = np.zeros((batch_size, seq_len), dtype=np.int64)  # token 0 everywhere: only the shape matters
    targets = np.zeros((batch_size, seq_len), dtype=np.int64)
    weights = weight_arrays(model)
    try:
        with np.errstate(all="ignore"):  # zero weights can make 0 / 0 (DoRA's norms): values don't matter
            logits, _, cache = model.forward(idx, targets, dropout_rng=host_rng(0))  # dropout where p > 0
            activations = cached_array_bytes((cache, logits, idx, targets), exclude=weights)
            tracemalloc.start()
            try:
                start = tracemalloc.get_traced_memory()[0]
                grads = model.backward(cache)
                tracer.mark("end of backward")
            finally:
                tracemalloc.stop()
    finally:
        model.ops = ops
    segments = tuple((label, peak - start) for label, peak in tracer.segments())
    return StepProbe(batch_size, activations, cached_array_bytes(grads, exclude=weights), segments)


_PROBES: dict = {}  # (config, T, lora_config, dtype, id(ops)) -> (ops, LedgerProbe); ops held: its id stays


def ledger_probe(
    config: GPTConfig,
    seq_len: int | None = None,
    lora_config: LoraConfig | None = None,
    dtype=np.float32,
    ops=None,
) -> LedgerProbe:
    """Build the model, count its weight lines and run the step probes at B = 1 and 2 (remembered)."""
    T = config.block_size if seq_len is None else seq_len
    key = (config, T, lora_config, np.dtype(dtype).str, id(ops))
    if key not in _PROBES:
        model = probe_model(config, lora_config, dtype, ops)
        gradients = sum(int(model.params[name].nbytes) for name in model.trainable_names)
        probe = LedgerProbe(
            weights=cached_array_bytes(weight_arrays(model)),
            gradients=gradients,
            optimizer_state=ADAM_BUFFERS * gradients,
            steps=tuple(probe_step(model, B, T) for B in PROBE_BATCH_SIZES),
        )
        _PROBES[key] = (ops, probe)
    return _PROBES[key][1]


def memory_ledger(
    config: GPTConfig,
    batch_size: int,
    seq_len: int | None = None,
    lora_config: LoraConfig | None = None,
    dtype=np.float32,
    *,
    ops=None,
) -> MemoryLedger:
    """The ledger of one AdamW training step at (B, T) = (batch_size, seq_len or block_size).

    ``lora_config=None`` is full fine-tuning; ``ops`` a namespace of layer functions for the model
    (default: its reference ones). Read off real probe steps; see the module docstring.

    >>> from minilora.config import get_preset
    >>> attention = LoraConfig(r=8, target_modules=("c_attn", "attn.c_proj"))
    >>> ledger = memory_ledger(get_preset("small"), 16, lora_config=attention)
    >>> ledger.gradients == 4 * 8 * ((128 + 384) + (128 + 128)) * 4   # 4 blocks x r (C_in + C_out) x 4 bytes
    True
    >>> ledger.optimizer_state == 2 * ledger.gradients                 # two Adam buffers per adapter number
    True
    >>> ledger.activations > 10 * (ledger.weights + ledger.gradients + ledger.optimizer_state)
    True
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return ledger_probe(config, seq_len, lora_config, dtype, ops).ledger(int(batch_size))


def ledger_table(batch_sizes: dict, lora_config: LoraConfig, dtype=np.float32, *, ops=None) -> list[dict]:
    """One row per preset and mode (full, LoRA): the ledger's lines in bytes, for tables and plots.

    ``batch_sizes`` maps preset names to the batch size used, e.g. bench.BENCH_BATCH_SIZES. Each
    preset and mode costs two probe steps (B = 1 and 2) at T = block_size: seconds at gpt2s.
    """
    rows = []
    for preset, batch_size in batch_sizes.items():
        config = get_preset(preset)
        for mode, lora in (("full", None), ("lora", lora_config)):
            ledger = memory_ledger(config, batch_size, lora_config=lora, dtype=dtype, ops=ops)
            rows.append({"preset": preset, "mode": mode, "batch_size": batch_size, **ledger.to_dict()})
    return rows


def _is_array(item) -> bool:
    """A NumPy or CuPy array (or NumPy scalar): it has a shape, a dtype and a size in bytes."""
    return not isinstance(item, type) and all(hasattr(item, name) for name in ("shape", "dtype", "nbytes"))


def _owner(array):
    """The array that owns a view's memory (the view itself if it owns its own)."""
    while getattr(array, "base", None) is not None and _is_array(array.base):
        array = array.base
    return array


def cached_array_bytes(obj, exclude=()) -> int:
    """Bytes of the distinct arrays reachable from ``obj``.

    It walks tuples (NamedTuple caches are tuples), lists, dict values and dataclass instances' fields,
    and ignores everything else: numbers, strings, functions, a namespace of functions (a model's
    ``ops``), modules, models. Views count once, as the array that owns their memory; arrays whose
    memory belongs to one in ``exclude`` (the model's parameters, which caches reference) are not
    counted.
    """
    excluded = {id(_owner(array)) for array in exclude}
    found = {}  # id -> owning array (held, so no id is reused while we walk)
    walked = set()  # containers seen: caches share sub-objects, and a cycle must not loop
    stack = [obj]
    while stack:
        item = stack.pop()
        if _is_array(item):
            root = _owner(item)
            if id(root) not in excluded:
                found[id(root)] = root
            continue
        if id(item) in walked:
            continue
        if isinstance(item, dict):
            walked.add(id(item))
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            walked.add(id(item))
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            walked.add(id(item))
            stack.extend(getattr(item, field.name) for field in dataclasses.fields(item))
    return sum(int(array.nbytes) for array in found.values())


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the rest of minilora reports sizes)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
