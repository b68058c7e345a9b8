"""Benchmarks of one training step: time, throughput, FLOPs, MFU, memory, and a PyTorch peer.

``run_bench(BenchSettings(...))`` times the training loop's work, forward + backward + gradient
clipping + AdamW, for a preset in LoRA or full mode, after a warm-up, and returns one flat dict that
``minilora bench`` prints as a JSON line. The presets are minilora's GPT sizes (config.PRESETS) and
``smollm2``, SmolLM2-135M-Instruct's LoRA step. One runner times them all; what depends on the
model is its preset's kind (``GPTBench``, ``SmolLM2Bench``): how the model is built, how its FLOPs
are known, and which peer it is timed against. What it measures, and how:

- Step time: each step on its own clock (the GPU is synchronised first), ``steps`` steps per run,
  ``repeats`` runs; median, min and max over every timed step. tokens/s = B T / median step time.
- FLOPs per step count matrix products only. A GPT's come from the formula ``step_flops``: the
  forward makes 2 N P for the matmul parameters P (N = B T tokens) plus 4 B T^2 C per layer for
  q k^T and att v over the full T x T (no causal saving: minilora computes the masked half too).
  Full fine-tuning's backward is twice the forward. LoRA's backward has the input gradients of the
  frozen weights (once the forward) but no dW of them, plus all of the adapter's products (twice its
  forward). ``minilora.backend.count_matmuls`` checks this formula in the tests. SmolLM2's are
  counted, not estimated: every product of the first warm-up step, through ``count_matmuls``,
  including the masked half of attention's T x T.
- MFU = achieved FLOP/s over a matmul peak in the run's dtype measured in the same process, with the
  same BLAS and thread settings, before and after the timed runs (the larger counts).
- Memory: the peak resident set (VmHWM) over the resident set before the model is built, the peak
  reset there (the batches' tokens are loaded before); SmolLM2's peak is reset again once it is
  loaded, so the loader's temporary copies are left out. On a GPU the CuPy memory pool's high-water
  mark (its free blocks released before the model is built, and for SmolLM2 after, so a bf16 run's
  float32 originals are left out too). A GPT also gets the ledger of ``minilora.lab.memory`` and,
  on the CPU, the peak of one traced step (``tracemalloc`` sees NumPy's arrays).
- The peer (``peer="torch"``), imported only then and by path from the source checkout (minilora
  never imports torch): for a GPT ``minilora.lab.torch_peer``, the same model and step in PyTorch
  eager, given minilora's initial weights; for SmolLM2 transformers' ``LlamaForCausalLM`` with a
  ``peft`` adapter (``minilora.lab.peft_peer``), given the same float32 weights and the very adapter
  minilora made (lora_A random, lora_B zero), written in PEFT's format, so the first losses agree to
  float32 rounding (``first_loss_rel_diff``). With ``dtype`` "bfloat16" on a GPU (mixed precision,
  as ``minilora finetune --dtype bfloat16``) minilora casts its frozen base to bf16 after adding the
  adapter, and SmolLM2's peer is a bf16 base under PEFT's float32 adapter; the adapter and AdamW's
  state stay float32 on both sides, and the first losses agree to bf16 rounding. Both sides get the
  same batches and AdamW settings and are timed in the same process, run for run alternating with
  minilora, so both see the same machine state; ``ratio`` is minilora's tokens/s over the peer's,
  per run, and ``memory_ratio`` minilora's peak memory over the peer's (on the GPU each side's own
  allocator, CuPy's pool against torch's max_memory_allocated; on the CPU each side's peak resident
  set over its resident set before it built its model). On the CPU both share one process and
  minilora goes first, so the peer may reuse pages minilora freed: if anything, this favours the peer.

Benchmarks are never timed tests: the tests check the formulas, the fields and the peer's loss,
never a wall time.
"""

from __future__ import annotations

import importlib
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np

from ..backend import (
    FLOAT_DTYPES,
    count_matmuls,
    float_dtype,
    get_backend,
    host_rng,
    matmul,
    resolve_device,
    synchronize,
    to_device,
    to_numpy,
)
from ..config import GPTConfig, get_preset
from ..fast import accelerate
from ..fast.cpu.host_memory import retain_freed_memory
from ..fast.cuda.graph import GraphedStep
from ..io.bases import SMOLLM2, load_base
from ..io.bpe import BPETokenizer
from ..io.data import load_corpus, tokenize_corpus
from ..io.peft import export_peft
from ..io.provenance import provenance
from ..io.smollm2 import fetch_smollm2
from ..jobs.finetune import ADAM_BETAS, check_training_dtype, make_optimizer
from ..lora.config import LoraConfig, select_target_modules
from ..lora.model import add_lora
from ..model import GPT, init_params
from ..training.batches import get_batch
from ..training.loop import DATA_STREAM, DROPOUT_STREAM, TrainSettings
from ..training.step import train_step
from .memory import memory_ledger

BENCH_BATCH_SIZES = {"tiny": 16, "small": 16, "medium": 16, "gpt2s": 8}  # B per GPT preset (T = block_size)
DEFAULT_LORA = LoraConfig(r=8, lora_alpha=16.0, target_modules=("c_attn", "attn.c_proj"))  # the GPTs' adapter
SMOLLM2_LORA = LoraConfig(r=8, lora_alpha=16.0, target_modules=("q_proj", "v_proj"))  # PEFT's default targets
SMOLLM2_BATCH_SHAPE = (4, 256)  # B, and T in BPE tokens
PRESET_ADAPTER = "the preset's"  # BenchSettings.lora_config's default: the preset's kind's own adapter
TRANSFORMERS_ATTENTION = {"math": "eager", "sdpa": "sdpa"}  # peer_attention as transformers names it
RECORDED_SETTINGS = (
    "lr",
    "weight_decay",
    "grad_clip",
    "seed",
    "corpus",
    "peak_size",
)  # the result's "settings"
OPENBLAS_ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # read by OpenBLAS once, when NumPy loads it
PEAK_SIZES = {"cpu": 2048, "cuda": 8192}  # n of the (n, n) @ (n, n) product that measures the peak
PEAK_REPEATS = 5


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says how to fix it."""


def step_flops(
    config: GPTConfig, batch_size: int, seq_len: int | None = None, lora_config: LoraConfig | None = None
) -> dict:
    """Matmul FLOPs of one training step (forward + backward); ``lora_config=None`` is full fine-tuning.

    With N = B T tokens, L layers, C channels and V the vocabulary:

        dense      = 2 N (12 L C^2 + V C)     the four linear layers per block (12 C^2 weights)
                                              and the tied output head (V C), forward
        attention  = 4 L B T^2 C              q k^T and att v, 2 B T^2 C each, full T x T
        lora       = 2 N sum r (C_in + C_out) x A^T and h B^T of every adapted module

        full:  forward = dense + attention,          backward = 2 forward  (dx and dW of everything)
        LoRA:  forward = dense + attention + lora,   backward = dense (dx only: no dW of frozen
               weights) + 2 attention + 2 lora (dx, dA and dB of the adapter)

    Returns the forward, backward and total, and the three forward parts.
    """
    B, T = batch_size, config.block_size if seq_len is None else seq_len
    N, L, C, V = B * T, config.n_layer, config.n_embd, config.vocab_size
    dense = 2 * N * (12 * L * C * C + V * C)
    attention = 4 * L * B * T * T * C
    if lora_config is None:
        lora = 0
        forward = dense + attention
        backward = 2 * forward
    else:
        lora = (
            2
            * N
            * sum(
                lora_config.r * (C_in + C_out)
                for C_in, C_out in select_target_modules(lora_config, config).values()
            )
        )
        forward = dense + attention + lora
        backward = dense + 2 * attention + 2 * lora
    return {
        "forward": forward,
        "backward": backward,
        "total": forward + backward,
        "dense_forward": dense,
        "attention_forward": attention,
        "lora_forward": lora,
    }


@dataclass
class BenchSettings:
    preset: str = "medium"  # a GPT preset (config.PRESETS) or "smollm2"
    lora_config: LoraConfig | str | None = PRESET_ADAPTER  # the adapter to train; None: full fine-tuning
    device: str | None = None  # cpu or cuda; None: $MINILORA_DEVICE, else cpu
    batch_size: int | None = None  # None: the preset's (BENCH_BATCH_SIZES; smollm2 4)
    seq_len: int | None = None  # T; None: the preset's block_size (smollm2 256 tokens)
    warmup: int = 2  # untimed steps first, at least 1 (the first allocates AdamW's state)
    steps: int = 5  # timed steps per run
    repeats: int = 3  # runs; with a peer, minilora's and the peer's runs alternate
    lr: float = 1e-3
    # AdamW's decoupled decay, on matrices (both models alike); None: the preset's, 0.1 for a GPT (as
    # pretraining), 0.0 for smollm2 (as minilora finetune and PEFT's examples)
    weight_decay: float | None = None
    grad_clip: float = 1.0  # global norm clipping, as the training loop does; 0 turns it off
    seed: int = 0
    dtype: str = "float32"
    # batches from this corpus (smollm2: its validation split in BPE ids); None: uniform random tokens
    corpus: str | None = "shakespeare_modern"
    peer: str | None = None  # "torch": time the preset's PyTorch peer side by side
    peer_threads: int = 2  # torch.set_num_threads
    peer_attention: str = "math"  # "math" (full T x T, as minilora; transformers' "eager") or "sdpa"
    peer_autocast: str | None = None  # a GPT peer's forward under torch.autocast: None or "bfloat16"
    peer_compile: bool = False  # a GPT peer's forward through torch.compile
    threads: int | None = (
        None  # CPU threads: batch shards and BLAS threads; None: data_parallel.cpu_threads()
    )
    peak_size: int | None = None  # n of the peak matmul; None: PEAK_SIZES[device]
    trace_memory: bool = True  # a GPT's extra, untimed step under tracemalloc (CPU only)
    cuda_graph: bool = True  # on a GPU, replay the step as a CUDA graph (fast.cuda.graph.GraphedStep)
    reference: bool = False  # time the reference layers and train_step instead of the fast path
    tf32: bool = False  # on a GPU, float32 products on TF32 tensor cores (both minilora and the peer)
    quantized: str | None = (
        None  # smollm2, QLoRA: the frozen matrices in blocks, "gguf", "q4_1", "q8_0", "nf4"
    )
    gradient_checkpointing: bool = False  # smollm2: recompute each block in the backward
    loss_chunk_rows: int | None = None  # smollm2: the head and the loss this many positions at a time

    def __post_init__(self):
        for name in ("warmup", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.peer not in (None, "torch"):
            raise ValueError(f"unknown peer {self.peer!r}; the only peer is 'torch'")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype!r}")
        kind = self.kind  # an unknown preset fails here, with the list of presets
        if isinstance(self.lora_config, str):
            self.lora_config = kind.lora_config
        if self.weight_decay is None:
            self.weight_decay = kind.weight_decay
        kind.check(self)
        if self.dtype == "bfloat16" and self.lora_config is None:
            raise ValueError(
                "dtype bfloat16 trains LoRA adapters in float32 over a bf16 base; full fine-tuning would "
                "need float32 master copies of every weight, which minilora does not keep: use float32"
            )

    @property
    def kind(self) -> GPTBench | SmolLM2Bench:
        return preset_kind(self.preset)

    @property
    def mode(self) -> str:
        return "full" if self.lora_config is None else "lora"

    def config(self) -> GPTConfig:
        """A GPT preset's config, dropout off."""
        return GPTBench(self.preset).config()

    def batch_shape(self) -> tuple[int, int]:
        """(B, T) of every batch."""
        return self.kind.batch_shape(self)


# The host's resident set, from /proc (Linux). Writing 5 to clear_refs resets the peak (VmHWM), so
# each phase of a run gets its own peak; elsewhere the process-wide ru_maxrss stands in.


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def current_rss_bytes() -> int | None:
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    peak = _proc_status_bytes("VmHWM")
    if peak is None:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, kB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def blas_info() -> list[dict]:
    """The BLAS and OpenMP libraries loaded, their threads and kernels (threadpoolctl's view)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [
            {"error": "threadpoolctl is not installed (pip install threadpoolctl) to report BLAS kernels"}
        ]
    keys = ("user_api", "internal_api", "num_threads", "version", "architecture", "threading_layer", "prefix")
    return [{key: info[key] for key in keys if key in info} for info in threadpool_info()]


def gpu_info(xp) -> dict | None:
    """The GPU, driver, CUDA runtime and CuPy versions, and whether CuPy's matmuls may use TF32 (None on the CPU)."""
    if xp is np:
        return None
    from ..fast.cuda import blas as cuda_blas

    runtime = xp.cuda.runtime
    properties = runtime.getDeviceProperties(xp.cuda.Device().id)
    return {
        "name": properties["name"].decode(),
        "cupy": xp.__version__,
        "driver": runtime.driverGetVersion(),
        "runtime": runtime.runtimeGetVersion(),
        "tf32": cuda_blas.tf32_enabled(),
    }


def openblas_env() -> dict:
    """The OpenBLAS variables as this process saw them at start (None: unset, OpenBLAS's own choice)."""
    return {name: os.environ.get(name) for name in OPENBLAS_ENV_VARS}


def matmul_peak_gflops(xp, n: int, dtype: str = "float32", repeats: int = PEAK_REPEATS) -> float:
    """Best GFLOP/s of an (n, n) @ (n, n) product on ``xp``'s device, after a warm-up product."""
    rng = host_rng(0)
    dtype = float_dtype(dtype)
    a = to_device(rng.standard_normal((n, n)).astype(dtype), "cpu" if xp is np else "cuda")
    b = to_device(rng.standard_normal((n, n)).astype(dtype), "cpu" if xp is np else "cuda")
    matmul(a, b)  # the product the training step uses (minilora's cuBLAS handle on a GPU)
    synchronize(xp)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        matmul(a, b)
        synchronize(xp)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def load_torch_peer():
    """The PyTorch peer, ``minilora.lab.torch_peer``, imported only now: minilora itself never imports torch."""
    try:
        return importlib.import_module("minilora.lab.torch_peer")
    except ModuleNotFoundError as err:
        if err.name == "torch":
            raise BenchError(
                "--peer torch needs PyTorch, which minilora never installs: pip install 'torch==2.13.0' "
                "--index-url https://download.pytorch.org/whl/cpu"
            ) from err
        raise


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class Timed:
    """Step times of one model, in runs."""

    def __init__(self):
        self.runs = []

    def all_steps(self) -> list[float]:
        return [t for run in self.runs for t in run]


def warm_up_peer(peer, record: dict, batch, warmup: int) -> None:
    """The peer's untimed steps; its first loss and the memory they took go into ``record``."""
    for step in range(warmup):
        loss = peer.step(*batch(step))
        if step == 0:
            record["loss_first"] = float(loss)
    record["peak_rss_increase_bytes"] = increase(peak_rss_bytes(), record.pop("_rss_before"))
    record["peak_device_bytes"] = peer.peak_device_bytes()


def time_runs(minilora_step, peer, batch, first_step: int, steps: int, repeats: int, log):
    """``repeats`` runs of ``steps`` steps each, minilora's run then the peer's (if any) on the same batches.

    minilora_step(step) -> (seconds, loss); the peer's steps are timed here, after a device sync.
    Returns (minilora's Timed, the peer's Timed, minilora's last loss, the peer's last loss).
    """
    timed, peer_timed = Timed(), Timed()
    loss = peer_loss = None
    step = first_step
    for run in range(repeats):
        log(f"run {run + 1}/{repeats}: {steps} steps" + (" each, minilora then the peer" if peer else ""))
        times = []
        for i in range(steps):
            seconds, loss = minilora_step(step + i)
            times.append(seconds)
        timed.runs.append(times)
        if peer is not None:
            peer_times = []
            for i in range(steps):
                x, y = batch(step + i)
                peer.synchronize()
                started = time.perf_counter()
                peer_loss = peer.step(x, y)
                peer.synchronize()
                peer_times.append(time.perf_counter() - started)
            peer_timed.runs.append(peer_times)
        step += steps
    return timed, peer_timed, loss, peer_loss


def blas_threads(threads: int | None):
    """BLAS threads outside the sharded forward/backward (the peak matmul, clipping, AdamW)."""
    if threads is None:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def preset_kind(preset: str) -> GPTBench | SmolLM2Bench:
    """What the runner asks of a preset's model: its defaults, how it is built, its FLOPs, its peer."""
    return SmolLM2Bench() if preset == SMOLLM2 else GPTBench(preset)


def run_bench(settings: BenchSettings, log=None) -> dict:
    """Run the benchmark described by ``settings``; returns the result dict (see the module docstring).

    ``log``, if given, is called with short progress lines.
    """
    log = log or (lambda message: None)
    device = resolve_device(settings.device)
    settings.kind.check_dtype(settings, device)  # before CuPy or any weight is touched
    with blas_threads(settings.threads):
        return _run(BenchRun(settings, device, log))


def _run(run: BenchRun) -> dict:
    """The phases of one benchmark, in order: each measures what the next must not disturb."""
    settings, n = run.settings, run.peak_n
    run.log(f"matmul peak: ({n} x {n}) @ ({n} x {n}) {settings.dtype} on {run.device}")
    peak_before = run.matmul_peak()
    run.build()  # the model's memory is measured from here, before torch is imported
    warm = run.warm_up()
    peer, record = start_peer(run) if settings.peer else (None, None)
    timed, peer_timed, loss, peer_loss = time_runs(
        run.minilora_step, peer, run.batch, settings.warmup, settings.steps, settings.repeats, run.log
    )
    result = bench_result(run, warm, timed, float(loss), (peak_before, run.matmul_peak()))
    if peer is not None:
        add_peer(result, record, peer_timed, float(peer_loss), run.memory.increase(warm.peak_rss))
    return result


@dataclass(frozen=True)
class MemoryMark:
    """Where a model's memory is measured from: the resident set before it is built, the peak reset there."""

    rss_before: int | None
    peak_reset: bool  # False where the OS cannot reset the peak: it is then the whole process's

    @classmethod
    def now(cls, xp) -> MemoryMark:
        """Release the GPU pool's free blocks, reset the peak resident set, and read the resident set."""
        if xp is not np:
            xp.get_default_memory_pool().free_all_blocks()
        peak_reset = reset_peak_rss()
        return cls(current_rss_bytes(), peak_reset)

    def increase(self, peak_rss: int) -> int | None:
        """How far the resident set rose above the mark at its peak (None if the peak could not be reset)."""
        return increase(peak_rss, self.rss_before) if self.peak_reset else None


@dataclass
class Built:
    """The model a run times, as its preset's kind built it."""

    model: object  # a GPT or a Llama, with its adapter unless full fine-tuning
    config: object  # its GPTConfig or LlamaConfig
    peer_start: object = None  # what the peer starts from (minilora's weights, adapter); None without one


@dataclass(frozen=True)
class Warmup:
    """What minilora's untimed steps measured."""

    loss_first: float
    counted_flops: int  # the products of the first step, through backend.count_matmuls
    peak_rss: int  # the peak resident set, the model built and its steps taken
    peak_device: int | None  # what the GPU's pools hold then (None on the CPU)


class BenchRun:
    """One benchmark run: its settings and device, the batches, and minilora's model and step once built."""

    def __init__(self, settings: BenchSettings, device: str, log):
        self.settings, self.kind, self.device, self.log = settings, settings.kind, device, log
        self.B, self.T = settings.batch_shape()
        self.xp = prepare_device(settings, device)
        self.peak_n = settings.peak_size or PEAK_SIZES[device]
        self.tokens = self.kind.tokens(settings)  # loaded before the memory is marked: they are not the model

    def matmul_peak(self) -> float:
        """The best GFLOP/s of the peak product in the run's dtype, now."""
        return matmul_peak_gflops(self.xp, self.peak_n, self.settings.dtype)

    def build(self) -> None:
        """minilora's model (its preset kind's), its optimiser and its step; the memory is marked first."""
        settings = self.settings
        self.memory = MemoryMark.now(self.xp)
        self.built = self.kind.build(self)
        self.model = self.built.model
        self.optimizer = make_optimizer(
            self.model, TrainSettings(lr=settings.lr, weight_decay=settings.weight_decay)
        )
        if settings.reference:  # the readable layers and train_step, as a student reads them
            self.train = train_step
        else:  # the fast layer functions and step the training jobs use (minilora.fast)
            self.train = accelerate(
                self.model,
                self.optimizer,
                settings.grad_clip,
                shards=settings.threads,
                cuda_graph=settings.cuda_graph,
                graph_warmup=1,
            )

    def batch(self, step: int):
        """The (x, y) host arrays of ``step``: windows of the tokens as the training loop draws them, or random ids."""
        rng = host_rng(self.settings.seed, DATA_STREAM, step)
        if self.tokens is None:
            ids = (0, self.built.config.vocab_size, (self.B, self.T))
            return rng.integers(*ids), rng.integers(*ids)
        return get_batch(self.tokens, self.B, self.T, rng)

    def minilora_step(self, step: int) -> tuple[float, object]:
        """One training step on ``step``'s batch, on its own clock: (seconds, loss)."""
        settings = self.settings
        # host arrays: the forward range-checks and moves them, as in the training loop
        x, y = self.batch(step)
        synchronize(self.xp)
        started = time.perf_counter()
        dropout_key = (settings.seed, DROPOUT_STREAM, step)
        loss = self.train(self.model, self.optimizer, x, y, settings.lr, settings.grad_clip, dropout_key)
        synchronize(self.xp)
        return time.perf_counter() - started, loss

    def warm_up(self) -> Warmup:
        """The untimed steps: the first one's loss and its products counted, then the memory the model took."""
        settings = self.settings
        self.log(f"minilora {settings.preset} {settings.mode}: {settings.warmup} warm-up steps")
        with count_matmuls() as products:  # the first step runs eagerly, also under a CUDA graph
            loss_first = float(self.minilora_step(0)[1])
        for step in range(1, settings.warmup):
            self.minilora_step(step)
        return Warmup(loss_first, products.flops, peak_rss_bytes(), self.device_pool_bytes())

    def device_pool_bytes(self) -> int | None:
        """What CuPy's pools hold on the GPU, the CUDA graph's own included (None on the CPU)."""
        if self.xp is np:
            return None
        graph_pool = self.train.pool.total_bytes() if isinstance(self.train, GraphedStep) else 0
        return int(self.xp.get_default_memory_pool().total_bytes() + graph_pool)


def prepare_device(settings: BenchSettings, device: str):
    """The device's array module, set up as the training jobs set it up."""
    xp = get_backend(device)
    if xp is np:
        retain_freed_memory()  # as the training jobs do; the peer, in the same process, gets it too
        return xp
    from ..fast.cuda import blas as cuda_blas
    from ..fast.cuda import use_cublas

    cuda_blas.use_tf32(settings.tf32)
    if settings.dtype == "bfloat16":
        use_cublas()  # the bf16 products, the peak's and the reference step's too (CuPy's matmul has none)
    return xp


def start_peer(run: BenchRun) -> tuple[object, dict]:
    """The preset's peer, built from minilora's starting point, after its untimed steps; and its record."""
    peer, record = run.kind.build_peer(run)
    run.built.peer_start = None  # the peer holds its own copies now: ours go before its steps run
    warm_up_peer(peer, record, run.batch, run.settings.warmup)
    return peer, record


def bench_result(
    run: BenchRun, warm: Warmup, timed: Timed, loss_last: float, peaks: tuple[float, float]
) -> dict:
    """The result's fields: the run's shape, its times, FLOPs and MFU, memory, losses and machine."""
    settings, model, tokens = run.settings, run.model, run.B * run.T
    flops = run.kind.flops(run, warm.counted_flops)
    return {
        "preset": settings.preset,
        "mode": settings.mode,
        **lora_fields(settings.lora_config),
        "device": run.device,
        "dtype": settings.dtype,
        "batch_size": run.B,
        "seq_len": run.T,
        "tokens_per_step": tokens,
        "params_total": model.num_parameters(),
        "params_trainable": model.num_parameters(trainable_only=True),
        "warmup_steps": settings.warmup,
        "steps": settings.steps,
        "repeats": settings.repeats,
        **throughput(timed, tokens, flops["flops_per_step"], max(peaks)),
        **flops,
        "matmul_peak_gflops": max(peaks),
        "matmul_peak": {"n": run.peak_n, "before_gflops": peaks[0], "after_gflops": peaks[1]},
        "peak_rss_bytes": warm.peak_rss,
        "peak_device_bytes": warm.peak_device,
        **run.kind.memory_fields(run, warm),
        "loss_first": warm.loss_first,
        "loss_last": loss_last,
        "threads": settings.threads,
        "blas": blas_info(),
        "openblas_env": openblas_env(),
        "cuda_graph": isinstance(run.train, GraphedStep),
        "layer_ops": model.ops.name,
        "gpu": gpu_info(run.xp),
        "peer": None,
        "ratio": None,
        "memory_ratio": None,
        "settings": {key: value for key, value in asdict(settings).items() if key in RECORDED_SETTINGS},
        "provenance": provenance(run.device, settings.seed),
    }


def add_peer(result: dict, record: dict, peer_timed: Timed, peer_loss: float, rss_increase) -> None:
    """The peer's measurements into ``result``, with minilora's speed and memory over the peer's.

    ``rss_increase``: how far minilora's resident set rose (MemoryMark.increase), its memory on the CPU.
    """
    loss_first = result["loss_first"]
    record.update(
        throughput(
            peer_timed, result["tokens_per_step"], result["flops_per_step"], result["matmul_peak_gflops"]
        )
    )
    record["loss_last"] = peer_loss
    record["first_loss_rel_diff"] = abs(record["loss_first"] - loss_first) / abs(loss_first)
    # Under autocast the products run in bf16: the peer's own MFU is against that peak.
    own_peak = record.get("autocast_matmul_peak_gflops") or record["matmul_peak_gflops"]
    record["mfu_vs_own_peak"] = record["achieved_gflops"] / own_peak
    ratios = [mine / theirs for mine, theirs in zip(result["runs_tokens_per_s"], record["runs_tokens_per_s"])]
    if result["peak_device_bytes"] is not None:
        memory = result["peak_device_bytes"], record["peak_device_bytes"]
    else:
        memory = rss_increase, record["peak_rss_increase_bytes"]
    result["peer"] = record
    result["ratio"] = {**spread(ratios), "runs": ratios}
    result["memory_ratio"] = ratio_or_none(*memory)  # None where the peer's figure is missing or 0


class GPTBench:
    """A GPT preset: fresh weights, the FLOP formula, the memory ledger, and the PyTorch GPT as the peer."""

    lora_config = DEFAULT_LORA
    weight_decay = 0.1

    def __init__(self, preset: str):
        get_preset(preset)  # an unknown preset fails here, with the list of presets
        self.preset = preset

    def config(self) -> GPTConfig:
        return get_preset(self.preset, dropout=0.0)

    def batch_shape(self, settings: BenchSettings) -> tuple[int, int]:
        """B from BENCH_BATCH_SIZES unless given; T the block size unless given, and within it."""
        config = self.config()
        T = config.block_size if settings.seq_len is None else settings.seq_len
        if not 1 <= T <= config.block_size:
            raise ValueError(f"seq_len {T} must be in 1..block_size={config.block_size}")
        return (BENCH_BATCH_SIZES[self.preset] if settings.batch_size is None else settings.batch_size), T

    def check(self, settings: BenchSettings) -> None:
        """Refuse what only the SmolLM2 bench times: a quantized base and the memory switches."""
        if (
            settings.quantized is not None
            or settings.gradient_checkpointing
            or settings.loss_chunk_rows is not None
        ):
            raise ValueError(
                "--quantized, --gradient-checkpointing and --loss-chunk-rows are benchmarked with --preset smollm2 "
                "only (finetune takes the last two for a GPT too)"
            )

    def check_dtype(self, settings: BenchSettings, device: str) -> None:
        """float32 and float64 as they are; bfloat16 under finetune's rules."""
        if settings.dtype == "bfloat16":
            check_training_dtype(settings.dtype, device, settings.lora_config, quantized=None)

    def tokens(self, settings: BenchSettings):
        """The corpus's training split, in bytes (None: random tokens)."""
        return None if settings.corpus is None else load_corpus(settings.corpus).train

    def build(self, run: BenchRun) -> Built:
        """The preset's GPT from seeded weights, with the adapter; the peer starts from float32 copies of them."""
        settings, config = run.settings, self.config()
        params = init_params(config, seed=settings.seed, dtype=float_dtype(settings.dtype), device=run.device)
        base = GPT(config, params)
        model = (
            base if settings.lora_config is None else add_lora(base, settings.lora_config, seed=settings.seed)
        )
        # float32 copies (a bf16 base's values exactly): the peer keeps float32 weights under its autocast
        initial = (
            {
                name: to_numpy(value).astype(np.promote_types(value.dtype, np.float32))
                for name, value in model.params.items()
            }
            if settings.peer
            else None
        )
        return Built(model, config, initial)

    def flops(self, run: BenchRun, counted_flops: int) -> dict:
        """The formula's FLOPs, total and parts (the products a fast step counts miss its fused kernels')."""
        flops = step_flops(run.built.config, run.B, run.T, run.settings.lora_config)
        return {"flops_per_step": flops["total"], "flops": flops}

    def memory_fields(self, run: BenchRun, warm: Warmup) -> dict:
        """The memory ledger against what was measured, and on the CPU the peak of one traced step."""
        settings, xp = run.settings, run.xp
        traced = traced_step_peak(run) if settings.trace_memory and xp is np else None
        # The ledger's probes run on the CPU: with the CPU's own layer functions there, with the reference's for a GPU.
        ledger_ops = run.model.ops if xp is np else None
        # (a bf16 run's ledger is counted in float32: its probes run on the CPU, where bf16 is emulated)
        ledger_dtype = np.float32 if settings.dtype == "bfloat16" else np.dtype(settings.dtype)
        ledger = memory_ledger(
            run.built.config, run.B, run.T, settings.lora_config, dtype=ledger_dtype, ops=ledger_ops
        )
        rss_increase = run.memory.increase(warm.peak_rss)
        return {
            "memory": {
                "ledger": ledger.to_dict(),
                "rss_before_model_bytes": run.memory.rss_before,
                "peak_rss_increase_bytes": rss_increase,
                "peak_rss_increase_over_ledger": ratio_or_none(rss_increase, ledger.total),
                "traced_step_peak_bytes": traced,
                "traced_step_over_ledger": ratio_or_none(traced, ledger.per_step),
                "peak_device_over_ledger": ratio_or_none(warm.peak_device, ledger.total),
            }
        }

    def build_peer(self, run: BenchRun) -> tuple[object, dict]:
        """minilora.lab.torch_peer's GPT on minilora's initial weights; its record, with its own matmul peaks."""
        settings, device = run.settings, run.device
        run.log("loading the PyTorch peer, minilora.lab.torch_peer")
        module = load_torch_peer()
        info = module.configure(settings.peer_threads, device, tf32=settings.tf32)
        peak = module.matmul_peak_gflops(run.peak_n, dtype=settings.dtype, device=device)  # our dtype
        autocast_peak = (
            None
            if settings.peer_autocast is None
            else module.matmul_peak_gflops(run.peak_n, dtype=settings.peer_autocast, device=device)
        )
        reset_peak_rss()
        rss_before = current_rss_bytes()
        module.peak_device_bytes(device, reset=True)
        peer = torch_gpt(module, run)
        run.log(
            f"PyTorch peer: torch {info['torch']} on {device}, {info['threads']} threads, "
            f"attention {settings.peer_attention}, autocast {settings.peer_autocast}, "
            f"compile {settings.peer_compile}: {settings.warmup} warm-up steps"
        )
        record = {"name": "torch", **info, "attention": settings.peer_attention, "autocast": settings.peer_autocast,
                  "compile": settings.peer_compile, "matmul_peak_gflops": peak,
                  "autocast_matmul_peak_gflops": autocast_peak, "_rss_before": rss_before}  # fmt: skip
        return peer, record


def torch_gpt(module, run: BenchRun):
    """The peer's TorchGPT: minilora's shape, initial weights, adapter and AdamW settings."""
    settings, config, lora_config = run.settings, run.built.config, run.settings.lora_config
    spec = {
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "vocab_size": config.vocab_size,
    }
    return module.TorchGPT(
        spec,
        run.built.peer_start,
        run.model.trainable_names,
        adapted=() if lora_config is None else tuple(run.model.adapted_modules),
        scaling=1.0 if lora_config is None else lora_config.scaling,
        lr=settings.lr,
        betas=ADAM_BETAS,
        eps=run.optimizer.eps,
        weight_decay=settings.weight_decay,
        decay_names=sorted(run.optimizer.decay_names),
        grad_clip=settings.grad_clip,
        dtype="float32" if settings.dtype == "bfloat16" else settings.dtype,  # bf16: the peer's autocast
        attention=settings.peer_attention,
        device=run.device,
        autocast=settings.peer_autocast,
        compile=settings.peer_compile,
    )


def traced_step_peak(run: BenchRun) -> int:
    """The peak bytes of one more, untimed step (on the next unused batch) under tracemalloc."""
    settings = run.settings
    tracemalloc.start()
    try:
        run.minilora_step(settings.warmup + settings.repeats * settings.steps)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class SmolLM2Bench:
    """SmolLM2-135M-Instruct's LoRA step: its GGUF weights, counted FLOPs, transformers + PEFT as the peer."""

    lora_config = SMOLLM2_LORA
    weight_decay = 0.0

    def batch_shape(self, settings: BenchSettings) -> tuple[int, int]:
        """SMOLLM2_BATCH_SHAPE, B and T each unless given."""
        default_B, default_T = SMOLLM2_BATCH_SHAPE
        B = default_B if settings.batch_size is None else settings.batch_size
        T = default_T if settings.seq_len is None else settings.seq_len
        return B, T

    def check(self, settings: BenchSettings) -> None:
        """Refuse what this preset does not time: full fine-tuning, the GPT peer's switches, a quantized peer."""
        if settings.lora_config is None:
            raise ValueError("--preset smollm2 times a LoRA step: leave out --full")
        if settings.peer_autocast is not None or settings.peer_compile:
            raise ValueError(
                "--peer-autocast and --peer-compile apply to the GPT presets, not to --preset smollm2"
            )
        if settings.quantized is not None and settings.peer is not None:
            raise ValueError(
                "the peer has no quantized base here (PEFT delegates that to bitsandbytes): no --peer"
            )

    def check_dtype(self, settings: BenchSettings, device: str) -> None:
        """finetune's rules: float32, or bfloat16 on a GPU over a plain base."""
        check_training_dtype(settings.dtype, device, settings.lora_config, settings.quantized)

    def tokens(self, settings: BenchSettings):
        """The corpus's validation split in SmolLM2's BPE ids (None: random tokens)."""
        if settings.corpus is None:
            return None
        return tokenize_corpus(load_corpus(settings.corpus), BPETokenizer.from_gguf(fetch_smollm2())).val

    def build(self, run: BenchRun) -> Built:
        """SmolLM2 with the adapter, in the run's dtype; the loader's temporary copies are let go, the peak reset."""
        settings = run.settings
        run.log(f"loading SmolLM2-135M-Instruct on {run.device}")
        # No reference to the loaded base is kept: no float32 copy outlives a bf16 cast.
        base = load_base(SMOLLM2, run.device, block_size=run.T, quantized=settings.quantized)
        model = add_lora(base.model, settings.lora_config, seed=settings.seed)
        del base
        model.set_activation_memory(settings.gradient_checkpointing, settings.loss_chunk_rows)
        peer_start = peft_start(model) if settings.peer else None
        if settings.dtype == "bfloat16":
            # After add_lora, which made the adapter in float32, and after the peer's copies: the peer
            # casts the float32 weights itself, as a PEFT user does.
            model.cast_base(float_dtype(settings.dtype))
        if run.xp is not np:  # the loader's temporaries and a bf16 run's float32 originals go back to the GPU
            run.xp.get_default_memory_pool().free_all_blocks()
        reset_peak_rss()  # the steps' peak, from here: the loader's temporary copies are gone
        return Built(model, model.config, peer_start)

    def flops(self, run: BenchRun, counted_flops: int) -> dict:
        """The products the first step made, counted."""
        return {"flops_per_step": counted_flops}

    def memory_fields(self, run: BenchRun, warm: Warmup) -> dict:
        """How the base is held (its format, the memory switches, its bytes as held), and how far the RSS rose."""
        settings = run.settings
        return {
            "quantized": settings.quantized,
            "gradient_checkpointing": settings.gradient_checkpointing,
            "loss_chunk_rows": settings.loss_chunk_rows,
            "base_weights_bytes": sum(int(value.nbytes) for value in run.model.base_params.values()),
            "peak_rss_increase_bytes": run.memory.increase(warm.peak_rss),
        }

    def build_peer(self, run: BenchRun) -> tuple[object, dict]:
        """transformers' SmolLM2 under minilora's adapter in PEFT's format; its record, with its own matmul peak."""
        settings, device = run.settings, run.device
        run.log("loading the transformers + PEFT peer, minilora.lab.peft_peer")
        module, torch_peer = load_peft_peer(), load_torch_peer()
        info = torch_peer.configure(settings.peer_threads, device, tf32=settings.tf32)
        peak = torch_peer.matmul_peak_gflops(run.peak_n, dtype=settings.dtype, device=device)  # as ours
        rss_before = current_rss_bytes()
        module.peak_device_bytes(device, reset=True)
        weights, adapter_dir = run.built.peer_start
        attention = TRANSFORMERS_ATTENTION[settings.peer_attention]
        with adapter_dir as adapter_path:
            peer = module.PeftLlama(
                run.built.config.to_dict(), weights, adapter_path, lr=settings.lr, betas=ADAM_BETAS,
                eps=run.optimizer.eps, weight_decay=settings.weight_decay, grad_clip=settings.grad_clip,
                attention=attention, dtype=settings.dtype, device=device,
            )  # fmt: skip
        reset_peak_rss()  # the peer's steps' peak, from here: its loader's copies are gone too
        run.log(
            f"peer: torch {info['torch']}, transformers + PEFT, {settings.dtype}, {attention}, "
            f"{info['threads']} threads"
        )
        record = {"name": "transformers+peft", **info, **module.versions(), "attention": attention,
                  "params_trainable": peer.num_trainable(), "matmul_peak_gflops": peak,
                  "_rss_before": rss_before}  # fmt: skip
        return peer, record


def peft_start(model) -> tuple[dict, tempfile.TemporaryDirectory]:
    """What the PEFT peer starts from: copies of the float32 base weights, and this very adapter in PEFT's format."""
    adapter_dir = tempfile.TemporaryDirectory(prefix="minilora-bench-")
    export_peft(model, adapter_dir.name)
    return {name: to_numpy(value) for name, value in model.base_params.items()}, adapter_dir


def load_peft_peer():
    """``minilora.lab.peft_peer``, imported only now: minilora itself never imports torch."""
    try:
        return importlib.import_module("minilora.lab.peft_peer")
    except ModuleNotFoundError as err:
        if err.name in ("torch", "transformers", "peft"):
            raise BenchError(
                f"--peer torch on smollm2 needs {err.name}, which minilora never installs: "
                "pip install 'torch==2.13.0' transformers peft"
            ) from err
        raise


def lora_fields(lora_config: LoraConfig | None) -> dict:
    """The adapter's r, lora_alpha and targets as the result's own fields (None each for full fine-tuning)."""
    if lora_config is None:
        return {"r": None, "lora_alpha": None, "targets": None}
    targets = lora_config.target_modules
    return {
        "r": lora_config.r,
        "lora_alpha": lora_config.lora_alpha,
        "targets": list(targets) if isinstance(targets, tuple) else targets,
    }


def throughput(timed: Timed, tokens: int, flops: int, peak_gflops: float) -> dict:
    steps = timed.all_steps()
    median = statistics.median(steps)
    achieved = flops / median / 1e9
    return {
        "step_time_s": spread(steps),
        "tokens_per_s": tokens / median,
        "runs_tokens_per_s": [tokens / statistics.median(run) for run in timed.runs],
        "achieved_gflops": achieved,
        "mfu": achieved / peak_gflops,
    }


def increase(after, before):
    return None if after is None or before is None else after - before


def ratio_or_none(numerator, denominator):
    """numerator / denominator, or None where either is missing or the denominator is 0."""
    return None if numerator is None or not denominator else numerator / denominator
