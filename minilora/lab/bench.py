"""Benchmarks of one training step: time, throughput, FLOPs, MFU, memory, and a PyTorch peer.

``run_bench(BenchSettings(...))`` times the training loop's work, forward + backward + gradient
clipping + AdamW, for a preset in LoRA or full mode, after a warm-up, and returns one flat dict that
``minilora bench`` prints as a JSON line. What it measures, and how:

- Step time: each step on its own clock (the GPU is synchronised first), ``steps`` steps per run,
  ``repeats`` runs; median, min and max over every timed step. tokens/s = B T / median step time.
- FLOPs per step count matrix products only (``step_flops``): the forward makes 2 N P for the
  matmul parameters P (N = B T tokens) plus 4 B T^2 C per layer for q k^T and att v over the full
  T x T (no causal saving: minilora computes the masked half too). Full fine-tuning's backward is
  twice the forward. LoRA's backward has the input gradients of the frozen weights (once the
  forward) but no dW of them, plus all of the adapter's products (twice its forward).
  ``minilora.backend.count_matmuls`` checks this formula in the tests.
- MFU = achieved FLOP/s over a float32 matmul peak measured in the same process, with the same BLAS
  and thread settings, before and after the timed runs (the larger counts).
- Memory: the ledger of ``minilora.lab.memory`` against the peak resident set (VmHWM, reset before the
  model is built), and, on the CPU, the peak of one traced step (``tracemalloc`` sees NumPy's
  arrays); on a GPU the CuPy memory pool's high-water mark.
- The peer (``peer="torch"``): ``minilora.lab.torch_peer``, the same model and step in
  PyTorch eager, is loaded by path from the source checkout (minilora never imports torch), given
  minilora's initial weights and the same batches, and timed in the same process, run for run
  alternating with minilora, so both see the same machine state; ``ratio`` is minilora's tokens/s
  over the peer's, per run.

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
import time
import tracemalloc
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np

from ..backend import (
    FLOAT_DTYPES,
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
from ..io.data import get_batch, load_corpus
from ..io.provenance import provenance
from ..jobs.finetune import ADAM_BETAS, check_training_dtype, make_optimizer
from ..lora.config import LoraConfig, select_target_modules
from ..lora.model import add_lora
from ..model import GPT, init_params
from ..training.loop import DATA_STREAM, DROPOUT_STREAM, TrainSettings, train_step
from .memory import memory_ledger

BENCH_BATCH_SIZES = {"tiny": 16, "small": 16, "medium": 16, "gpt2s": 8}  # B per preset (T = block_size)
DEFAULT_LORA = LoraConfig(
    r=8, lora_alpha=16.0, target_modules=("c_attn", "attn.c_proj")
)  # the bench's adapter
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
    preset: str = "medium"
    lora_config: LoraConfig | None = DEFAULT_LORA  # the adapter to train; None: full fine-tuning
    device: str | None = None  # cpu or cuda; None: $MINILORA_DEVICE, else cpu
    batch_size: int | None = None  # None: BENCH_BATCH_SIZES[preset]
    seq_len: int | None = None  # T; None: the preset's block_size
    warmup: int = 2  # untimed steps first, at least 1 (the first allocates AdamW's state)
    steps: int = 5  # timed steps per run
    repeats: int = 3  # runs; with a peer, minilora's and the peer's runs alternate
    lr: float = 1e-3
    weight_decay: float = 0.1  # AdamW's decoupled decay, on matrices (both models alike)
    grad_clip: float = 1.0  # global norm clipping, as the training loop does; 0 turns it off
    seed: int = 0
    dtype: str = "float32"
    corpus: str | None = "shakespeare_modern"  # batches from this corpus; None: uniform random tokens
    peer: str | None = None  # "torch": time minilora.lab.torch_peer side by side
    peer_threads: int = 2  # torch.set_num_threads
    peer_attention: str = "math"  # the peer's attention: "math" (full T x T, as minilora) or "sdpa"
    peer_autocast: str | None = None  # the peer's forward under torch.autocast: None or "bfloat16"
    peer_compile: bool = False  # the peer's forward through torch.compile
    threads: int | None = (
        None  # CPU threads: batch shards and BLAS threads; None: data_parallel.cpu_threads()
    )
    peak_size: int | None = None  # n of the peak matmul; None: PEAK_SIZES[device]
    trace_memory: bool = True  # one extra, untimed step under tracemalloc (CPU only)
    cuda_graph: bool = True  # on a GPU, replay the step as a CUDA graph (fast.cuda.graph.GraphedStep)
    reference: bool = False  # time the reference layers and train_step instead of the fast path
    tf32: bool = False  # on a GPU, float32 products on TF32 tensor cores (both minilora and the peer)

    def __post_init__(self):
        for name in ("warmup", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.peer not in (None, "torch"):
            raise ValueError(f"unknown peer {self.peer!r}; the only peer is 'torch'")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype!r}")
        if self.dtype == "bfloat16" and self.lora_config is None:
            raise ValueError(
                "dtype bfloat16 trains LoRA adapters in float32 over a bf16 base; full fine-tuning would "
                "need float32 master copies of every weight, which minilora does not keep: use float32"
            )
        get_preset(self.preset)  # an unknown preset fails here, with the list of presets

    @property
    def mode(self) -> str:
        return "full" if self.lora_config is None else "lora"

    def config(self) -> GPTConfig:
        return get_preset(self.preset, dropout=0.0)

    def batch_shape(self) -> tuple[int, int]:
        config = self.config()
        T = config.block_size if self.seq_len is None else self.seq_len
        if not 1 <= T <= config.block_size:
            raise ValueError(f"seq_len {T} must be in 1..block_size={config.block_size}")
        return (BENCH_BATCH_SIZES[self.preset] if self.batch_size is None else self.batch_size), T


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


def run_bench(settings: BenchSettings, log=None) -> dict:
    """Run the benchmark described by ``settings``; returns the result dict (see the module docstring).

    ``log``, if given, is called with short progress lines.
    """
    log = log or (lambda message: None)
    device = resolve_device(settings.device)
    with blas_threads(settings.threads):
        return _run(settings, device, log)


def _run(settings: BenchSettings, device: str, log) -> dict:
    xp = get_backend(device)
    if settings.dtype == "bfloat16":
        check_training_dtype(settings.dtype, device, settings.lora_config, quantized=None)  # finetune's rules
    if xp is np:
        retain_freed_memory()  # as the training jobs do; the peer, in the same process, gets it too
    else:
        from ..fast.cuda import blas as cuda_blas

        cuda_blas.use_tf32(settings.tf32)
    config, lora_config = settings.config(), settings.lora_config
    B, T = settings.batch_shape()
    peak_n = settings.peak_size or PEAK_SIZES[device]
    data = None if settings.corpus is None else load_corpus(settings.corpus).train

    def batch(step: int):
        rng = host_rng(settings.seed, DATA_STREAM, step)
        if data is None:
            return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))
        return get_batch(data, B, T, rng)

    log(f"matmul peak: ({peak_n} x {peak_n}) @ ({peak_n} x {peak_n}) {settings.dtype} on {device}")
    peak_before = matmul_peak_gflops(xp, peak_n, settings.dtype)

    # minilora: build, snapshot the initial weights for the peer, warm up; memory is measured here,
    # before torch is imported.
    pool = None if xp is np else xp.get_default_memory_pool()
    if pool is not None:
        pool.free_all_blocks()
    peak_reset = reset_peak_rss()
    rss_before = current_rss_bytes()
    base = GPT(
        config, init_params(config, seed=settings.seed, dtype=float_dtype(settings.dtype), device=device)
    )
    model = base if lora_config is None else add_lora(base, lora_config, seed=settings.seed)
    optimizer = make_optimizer(model, TrainSettings(lr=settings.lr, weight_decay=settings.weight_decay))
    initial = (
        # float32 copies (a bf16 base's values exactly): the peer keeps float32 weights under its autocast
        {
            name: to_numpy(value).astype(np.promote_types(value.dtype, np.float32))
            for name, value in model.params.items()
        }
        if settings.peer
        else None
    )

    if settings.reference:  # the readable layers and train_step, as a student reads them
        train = train_step
    else:  # the fast layer functions and step the training jobs use (minilora.fast)
        train = accelerate(
            model,
            optimizer,
            settings.grad_clip,
            shards=settings.threads,
            cuda_graph=settings.cuda_graph,
            graph_warmup=1,
        )
    graphed = isinstance(train, GraphedStep)

    def minilora_step(step: int):
        x, y = batch(step)  # host arrays: the forward range-checks and moves them, as in the training loop
        synchronize(xp)
        started = time.perf_counter()
        loss = train(
            model, optimizer, x, y, settings.lr, settings.grad_clip, (settings.seed, DROPOUT_STREAM, step)
        )
        synchronize(xp)
        return time.perf_counter() - started, loss

    log(f"minilora {settings.preset} {settings.mode}: {settings.warmup} warm-up steps")
    losses = [minilora_step(step)[1] for step in range(settings.warmup)]
    loss_first = float(losses[0])
    peak_rss = peak_rss_bytes()
    peak_device = (
        None if pool is None else int(pool.total_bytes() + (train.pool.total_bytes() if graphed else 0))
    )

    peer = peer_record = None
    if settings.peer:
        peer, peer_record = _build_peer(settings, device, model, optimizer, initial, config, lora_config, log)
        warm_up_peer(peer, peer_record, batch, settings.warmup)

    timed, peer_timed, loss, peer_loss = time_runs(
        minilora_step, peer, batch, settings.warmup, settings.steps, settings.repeats, log
    )
    step = settings.warmup + settings.repeats * settings.steps  # the next unused batch
    loss_last = float(loss)
    peak_after = matmul_peak_gflops(xp, peak_n, settings.dtype)
    peak = max(peak_before, peak_after)

    traced = None
    if settings.trace_memory and xp is np:
        tracemalloc.start()
        try:
            minilora_step(step)
            traced = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    flops = step_flops(config, B, T, lora_config)
    # The ledger's probes run on the CPU: with the CPU's own layer functions there, with the reference's for a GPU.
    ledger_ops = model.ops if xp is np else None
    # (a bf16 run's ledger is counted in float32: its probes run on the CPU, where bf16 is emulated)
    ledger_dtype = np.float32 if settings.dtype == "bfloat16" else np.dtype(settings.dtype)
    ledger = memory_ledger(config, B, T, lora_config, dtype=ledger_dtype, ops=ledger_ops)
    result = {
        "preset": settings.preset,
        "mode": settings.mode,
        **_lora_fields(lora_config),
        "device": device,
        "dtype": settings.dtype,
        "batch_size": B,
        "seq_len": T,
        "tokens_per_step": B * T,
        "params_total": model.num_parameters(),
        "params_trainable": model.num_parameters(trainable_only=True),
        "warmup_steps": settings.warmup,
        "steps": settings.steps,
        "repeats": settings.repeats,
        **throughput(timed, B * T, flops["total"], peak),
        "flops_per_step": flops["total"],
        "flops": flops,
        "matmul_peak_gflops": peak,
        "matmul_peak": {"n": peak_n, "before_gflops": peak_before, "after_gflops": peak_after},
        "peak_rss_bytes": peak_rss,
        "peak_device_bytes": peak_device,
        "memory": {
            "ledger": ledger.to_dict(),
            "rss_before_model_bytes": rss_before,
            "peak_rss_increase_bytes": increase(peak_rss, rss_before) if peak_reset else None,
            "peak_rss_increase_over_ledger": ratio_or_none(
                increase(peak_rss, rss_before) if peak_reset else None, ledger.total
            ),
            "traced_step_peak_bytes": traced,
            "traced_step_over_ledger": ratio_or_none(traced, ledger.per_step),
            "peak_device_over_ledger": ratio_or_none(peak_device, ledger.total),
        },
        "loss_first": loss_first,
        "loss_last": loss_last,
        "threads": settings.threads,
        "blas": blas_info(),
        "openblas_env": openblas_env(),
        "cuda_graph": graphed,
        "layer_ops": model.ops.name,
        "gpu": gpu_info(xp),
        "peer": None,
        "ratio": None,
        "settings": {
            key: value
            for key, value in asdict(settings).items()
            if key in ("lr", "weight_decay", "grad_clip", "seed", "corpus", "peak_size")
        },
        "provenance": provenance(device, settings.seed),
    }
    if peer is not None:
        peer_record.update(throughput(peer_timed, B * T, flops["total"], peak))
        peer_record["loss_last"] = float(peer_loss)
        peer_record["first_loss_rel_diff"] = abs(peer_record["loss_first"] - loss_first) / abs(loss_first)
        own_peak = peer_record["autocast_matmul_peak_gflops"] or peer_record["matmul_peak_gflops"]
        peer_record["mfu_vs_own_peak"] = peer_record["achieved_gflops"] / own_peak
        result["peer"] = peer_record
        ratios = [
            mine / theirs
            for mine, theirs in zip(result["runs_tokens_per_s"], peer_record["runs_tokens_per_s"])
        ]
        result["ratio"] = {**spread(ratios), "runs": ratios}
    return result


def _build_peer(settings, device, model, optimizer, initial, config, lora_config, log):
    log("loading the PyTorch peer, minilora.lab.torch_peer")
    module = load_torch_peer()
    info = module.configure(settings.peer_threads, device, tf32=settings.tf32)
    peak_n = settings.peak_size or PEAK_SIZES[device]
    peak = module.matmul_peak_gflops(peak_n, dtype=settings.dtype, device=device)  # the same dtype as ours
    # Under autocast the products run in bf16 (or fp16): its MFU is against that peak, measured here too.
    autocast_peak = (
        None
        if settings.peer_autocast is None
        else module.matmul_peak_gflops(peak_n, dtype=settings.peer_autocast, device=device)
    )
    reset_peak_rss()
    rss_before = current_rss_bytes()
    module.peak_device_bytes(device, reset=True)
    spec = {
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "vocab_size": config.vocab_size,
    }
    peer = module.TorchGPT(
        spec,
        initial,
        model.trainable_names,
        adapted=() if lora_config is None else tuple(model.adapted_modules),
        scaling=1.0 if lora_config is None else lora_config.scaling,
        lr=settings.lr,
        betas=ADAM_BETAS,
        eps=optimizer.eps,
        weight_decay=settings.weight_decay,
        decay_names=sorted(optimizer.decay_names),
        grad_clip=settings.grad_clip,
        dtype="float32" if settings.dtype == "bfloat16" else settings.dtype,  # bf16: the peer's autocast
        attention=settings.peer_attention,
        device=device,
        autocast=settings.peer_autocast,
        compile=settings.peer_compile,
    )
    log(
        f"PyTorch peer: torch {info['torch']} on {device}, {info['threads']} threads, "
        f"attention {settings.peer_attention}, autocast {settings.peer_autocast}, "
        f"compile {settings.peer_compile}: {settings.warmup} warm-up steps"
    )
    record = {
        "name": "torch",
        **info,
        "attention": settings.peer_attention,
        "autocast": settings.peer_autocast,
        "compile": settings.peer_compile,
        "matmul_peak_gflops": peak,
        "autocast_matmul_peak_gflops": autocast_peak,
        "_rss_before": rss_before,
    }
    return peer, record


def _lora_fields(lora_config: LoraConfig | None) -> dict:
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
