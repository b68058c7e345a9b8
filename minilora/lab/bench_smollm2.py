"""``minilora bench --preset smollm2``: a LoRA step on SmolLM2-135M, against transformers + PEFT.

The GPT benchmark (bench.py) measures minilora's own presets against a hand-written PyTorch GPT.
A real LLM has a real peer: what a PyTorch user runs to LoRA-fine-tune SmolLM2 is transformers'
``LlamaForCausalLM`` with a ``peft`` adapter (``peft_peer.py``). Both sides get:

- the same weights: SmolLM2-135M-Instruct from its GGUF file, in float32, as minilora loads them;
- the same adapter: minilora creates it (lora_A random, lora_B zero) and writes it in PEFT's format,
  and the peer loads that file, so the first losses agree to float32 rounding (``first_loss_rel_diff``);
- the same precision: ``dtype`` "float32", or "bfloat16" on a GPU (mixed precision, as ``minilora
  finetune --dtype bfloat16``): minilora casts its frozen base to bf16 after adding the adapter, the
  peer is a bf16 base under PEFT's float32 adapter (``peft_peer.py``); the adapter and AdamW's state
  stay float32 on both sides, and the first losses agree to bf16 rounding, not float32's;
- the same batches: windows of the corpus's validation split in SmolLM2's BPE ids;
- the same step: forward, cross-entropy, backward, clipping to norm 1, AdamW (lr, betas, eps, decay).

Timing is bench.py's: a warm-up, then ``repeats`` runs of ``steps`` steps each, minilora's run
and the peer's alternating, each step on its own clock after a device sync; ``ratio`` is minilora's
tokens/s over the peer's, run by run. FLOPs are counted, not estimated: every product of one
minilora step, through ``backend.count_matmuls``, including the masked half of attention's T x T;
MFU divides their rate by a matmul peak in the run's dtype that each side measures for itself, in the
same process.
Memory: on the CPU, the peak resident set during each side's warm-up steps over the process's
resident set before that side built its model (weights, adapter, optimiser state, activations; the
peak is reset after building, so the loaders' temporary copies are left out). Both live in one
process and minilora goes first, so the peer may reuse pages minilora freed: if anything, this
favours the peer. On a GPU, each side's own allocator: CuPy's pool (what it holds, a little more
than its high-water mark; its free blocks are released once the model is built, so the loader's
temporaries and a bf16 run's float32 originals are left out) against torch's max_memory_allocated.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..backend import (
    count_matmuls,
    float_dtype,
    get_backend,
    host_rng,
    resolve_device,
    synchronize,
    to_numpy,
)
from ..fast import accelerate
from ..fast.cpu.host_memory import retain_freed_memory
from ..fast.cuda.graph import GraphedStep
from ..io.bases import load_base
from ..io.data import get_batch, load_corpus, tokenize_corpus
from ..io.peft import export_peft
from ..io.provenance import provenance
from ..jobs.finetune import ADAM_BETAS, check_training_dtype, make_optimizer
from ..llama import set_activation_memory
from ..lora.config import LoraConfig
from ..lora.model import add_lora
from ..training.loop import DATA_STREAM, TrainSettings, train_step
from .bench import (
    PEAK_SIZES,
    BenchError,
    blas_info,
    blas_threads,
    current_rss_bytes,
    gpu_info,
    increase,
    matmul_peak_gflops,
    peak_rss_bytes,
    ratio_or_none,
    reset_peak_rss,
    spread,
    throughput,
    time_runs,
    warm_up_peer,
)

SMOLLM2_LORA = LoraConfig(r=8, lora_alpha=16.0, target_modules=("q_proj", "v_proj"))  # PEFT's default targets


@dataclass
class SmolLM2BenchSettings:
    lora_config: LoraConfig = field(default_factory=lambda: SMOLLM2_LORA)
    device: str | None = None  # cpu or cuda; None: $MINILORA_DEVICE, else cpu
    batch_size: int = 4
    seq_len: int = 256  # T, in BPE tokens
    warmup: int = 2
    steps: int = 3
    repeats: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0  # the fine-tuning default (minilora finetune, PEFT's examples)
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # or "bfloat16": a bf16 base and activations under a float32 adapter (GPU)
    corpus: str = "shakespeare_modern"  # batches from its validation split
    peer: str | None = None  # "torch": transformers + PEFT (peft_peer.py) side by side
    peer_threads: int = 2
    peer_attention: str = "eager"  # transformers' attn_implementation: "eager" or "sdpa"
    threads: int | None = None  # CPU batch shards; None: one per core
    cuda_graph: bool = True
    tf32: bool = False
    reference: bool = False  # time the reference layers and train_step instead of the fast path
    quantized: str | None = (
        None  # QLoRA: the frozen matrices in blocks, "gguf", "q4_1", "q8_0" or "nf4" (no peer)
    )
    gradient_checkpointing: bool = False  # recompute each block in the backward (llama.py)
    loss_chunk_rows: int | None = None  # the head and the loss this many positions at a time

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "warmup", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.peer not in (None, "torch"):
            raise ValueError(f"unknown peer {self.peer!r}; the only peer is 'torch'")
        if self.quantized is not None and self.peer is not None:
            raise ValueError(
                "the peer has no quantized base here (PEFT delegates that to bitsandbytes): no --peer"
            )


def load_peft_peer():
    """``minilora.lab.peft_peer``, imported only now: minilora itself never imports torch."""
    import importlib

    try:
        return importlib.import_module("minilora.lab.peft_peer")
    except ModuleNotFoundError as err:
        if err.name in ("torch", "transformers", "peft"):
            raise BenchError(
                f"--peer torch on smollm2 needs {err.name}, which minilora never installs: "
                "pip install 'torch==2.13.0' transformers peft"
            ) from err
        raise


def run_smollm2_bench(settings: SmolLM2BenchSettings, log=None) -> dict:
    """Time SmolLM2's LoRA step (and the peer's); returns one flat dict, see the module docstring."""
    log = log or (lambda message: None)
    device = resolve_device(settings.device)
    check_training_dtype(settings.dtype, device, settings.lora_config, settings.quantized)  # finetune's rules
    with blas_threads(settings.threads):
        return _run(settings, device, log)


def _run(settings: SmolLM2BenchSettings, device: str, log) -> dict:
    xp = get_backend(device)
    if xp is np:
        retain_freed_memory()
    else:
        from ..fast.cuda import blas as cuda_blas
        from ..fast.cuda import use_cublas

        cuda_blas.use_tf32(settings.tf32)
        if settings.dtype == "bfloat16":
            use_cublas()  # the bf16 products, the peak's and the reference step's too (CuPy's matmul has none)
    B, T = settings.batch_size, settings.seq_len
    peak = matmul_peak_gflops(xp, PEAK_SIZES[device], settings.dtype)
    pool = None if xp is np else xp.get_default_memory_pool()
    rss_before = current_rss_bytes()
    log(f"loading SmolLM2-135M-Instruct on {device}")
    base = load_base("smollm2", device, block_size=T, quantized=settings.quantized)
    data = tokenize_corpus(load_corpus(settings.corpus), base.tokenizer).val
    config = base.model.config
    model = add_lora(base.model, settings.lora_config, seed=settings.seed)
    del base  # the model holds the base's arrays now: no float32 copy outlives a bf16 cast
    set_activation_memory(model, settings.gradient_checkpointing, settings.loss_chunk_rows)
    optimizer = make_optimizer(model, TrainSettings(lr=settings.lr, weight_decay=settings.weight_decay))
    adapter_dir = tempfile.TemporaryDirectory(prefix="minilora-bench-") if settings.peer else None
    if adapter_dir is not None:
        export_peft(model, adapter_dir.name)  # the peer starts from this very adapter
    initial = {name: to_numpy(value) for name, value in model.base_params.items()} if settings.peer else None
    if settings.dtype == "bfloat16":
        # After add_lora, which made the adapter in float32, and after the peer's copies: the peer
        # casts the float32 weights itself, as a PEFT user does.
        model.cast_base(float_dtype(settings.dtype))
    if pool is not None:  # the loader's temporaries and a bf16 run's float32 originals go back to the GPU
        pool.free_all_blocks()
    if settings.reference:  # the readable layers and train_step, as a student reads them
        train = train_step
    else:
        train = accelerate(model, optimizer, settings.grad_clip, shards=settings.threads,
                           cuda_graph=settings.cuda_graph, graph_warmup=1)  # fmt: skip

    def batch(step: int):
        return get_batch(data, B, T, host_rng(settings.seed, DATA_STREAM, step))

    reset_peak_rss()  # the steps' peak, from here: the loader's temporary copies are gone

    def minilora_step(step: int):
        x, y = batch(step)
        synchronize(xp)
        started = time.perf_counter()
        loss = train(model, optimizer, x, y, settings.lr, settings.grad_clip, None)
        synchronize(xp)
        return time.perf_counter() - started, loss

    log(f"minilora: {settings.warmup} warm-up steps")
    with count_matmuls() as products:  # the first step runs eagerly, also under a CUDA graph
        loss_first = float(minilora_step(0)[1])
    flops = products.flops
    for step in range(1, settings.warmup):
        minilora_step(step)
    peak_rss = peak_rss_bytes()
    graphed = isinstance(train, GraphedStep)
    peak_device = (
        None if pool is None else int(pool.total_bytes() + (train.pool.total_bytes() if graphed else 0))
    )

    peer = peer_record = None
    if settings.peer:
        peer, peer_record = _build_peer(settings, device, config, initial, adapter_dir.name, optimizer, log)
        del initial
        warm_up_peer(peer, peer_record, batch, settings.warmup)

    timed, peer_timed, _, _ = time_runs(
        minilora_step, peer, batch, settings.warmup, settings.steps, settings.repeats, log
    )

    lora = settings.lora_config
    result = {
        "preset": "smollm2",
        "mode": "lora",
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "targets": list(lora.target_modules)
        if isinstance(lora.target_modules, tuple)
        else lora.target_modules,
        "device": device,
        "dtype": settings.dtype,
        "batch_size": B,
        "seq_len": T,
        "tokens_per_step": B * T,
        "params_total": model.num_parameters(),
        "params_trainable": model.num_parameters(trainable_only=True),
        "quantized": settings.quantized,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "loss_chunk_rows": settings.loss_chunk_rows,
        "base_weights_bytes": sum(int(value.nbytes) for value in model.base_params.values()),  # as held
        "steps": settings.steps,
        "repeats": settings.repeats,
        **throughput(timed, B * T, flops, peak),
        "matmul_peak_gflops": peak,
        "flops_per_step": flops,
        "peak_rss_bytes": peak_rss,
        "peak_rss_increase_bytes": increase(peak_rss, rss_before),
        "peak_device_bytes": peak_device,
        "loss_first": loss_first,
        "cuda_graph": graphed,
        "layer_ops": model.ops.name,
        "threads": settings.threads,
        "blas": blas_info(),
        "gpu": gpu_info(xp),
        "peer": None,
        "ratio": None,
        "settings": {
            k: v
            for k, v in asdict(settings).items()
            if k in ("lr", "weight_decay", "grad_clip", "seed", "corpus")
        },
        "provenance": provenance(device, settings.seed),
    }
    if peer is not None:
        peer_record.update(throughput(peer_timed, B * T, flops, peer_record["matmul_peak_gflops"]))
        peer_record["first_loss_rel_diff"] = abs(peer_record["loss_first"] - loss_first) / abs(loss_first)
        peer_record["params_trainable"] = peer.num_trainable()
        result["peer"] = peer_record
        ratios = [
            mine / theirs
            for mine, theirs in zip(result["runs_tokens_per_s"], peer_record["runs_tokens_per_s"])
        ]
        result["ratio"] = {**spread(ratios), "runs": ratios}
        memory = (peak_device, peer_record["peak_device_bytes"]) if pool is not None else (
            result["peak_rss_increase_bytes"], peer_record["peak_rss_increase_bytes"])  # fmt: skip
        result["memory_ratio"] = ratio_or_none(*memory)  # None where the peer's figure is missing or 0
    if adapter_dir is not None:
        adapter_dir.cleanup()
    return result


def _build_peer(settings, device, config, params, adapter_dir, optimizer, log):
    log("loading the transformers + PEFT peer, minilora.lab.peft_peer")
    module = load_peft_peer()
    from . import torch_peer

    info = torch_peer.configure(settings.peer_threads, device, tf32=settings.tf32)
    peak = torch_peer.matmul_peak_gflops(PEAK_SIZES[device], dtype=settings.dtype, device=device)  # as ours
    rss_before = current_rss_bytes()
    module.peak_device_bytes(device, reset=True)
    peer = module.PeftLlama(
        config.to_dict(), params, adapter_dir, lr=settings.lr, betas=ADAM_BETAS, eps=optimizer.eps,
        weight_decay=settings.weight_decay, grad_clip=settings.grad_clip, attention=settings.peer_attention,
        dtype=settings.dtype, device=device,
    )  # fmt: skip
    reset_peak_rss()
    log(
        f"peer: torch {info['torch']}, transformers + PEFT, {settings.dtype}, {settings.peer_attention}, "
        f"{info['threads']} threads"
    )
    record = {"name": "transformers+peft", **info, **module.versions(), "attention": settings.peer_attention,
              "matmul_peak_gflops": peak, "_rss_before": rss_before}  # fmt: skip
    return peer, record
