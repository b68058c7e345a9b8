"""Subcommand bench: time training steps and print one JSON line (see minilora.lab.bench)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import PRESETS
from .arg_types import add_old_name, non_negative_int, positive_float, positive_int
from .base_commands import add_memory_flags, add_quantized_flag
from .lora_commands import lora_config_from_args


def add_bench_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time training steps (LoRA or --full) and print one JSON line",
        description="Time the training step (forward, backward, clipping, AdamW) of a preset after a warm-up, in "
        "LoRA or full mode, and print one JSON line: parameters, step times, tokens/s, matmul FLOPs, "
        "achieved GFLOP/s and MFU against a matmul peak in the run's dtype measured in the same run, peak memory "
        "and the memory ledger. --peer torch times the same step in PyTorch eager side by side "
        "(needs torch and a source checkout). Kernel choice: OpenBLAS reads OPENBLAS_CORETYPE and "
        "OPENBLAS_L2_SIZE when NumPy loads, so set or unset them in the shell, e.g. "
        "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE minilora bench ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=[*sorted(PRESETS), "smollm2"],
        default="medium",
        help="model size; smollm2: SmolLM2-135M-Instruct's LoRA step, the peer transformers + PEFT",
    )
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, default=8, help="rank of the update")
    lora.add_argument("--alpha", type=positive_float, default=16.0, help="lora_alpha")
    lora.add_argument(
        "--targets",
        default=None,
        help="comma-separated module names matched by suffix, or all-linear "
        "(default: c_attn,attn.c_proj; for smollm2 q_proj,v_proj)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="B (default: tiny 16, small 16, medium 16, gpt2s 8, smollm2 4)",
    )
    run.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help="T (default: the preset's block size; smollm2 256 tokens)",
    )
    warmup = run.add_argument(
        "--warmup-steps", dest="warmup", type=positive_int, default=2, help="untimed steps first"
    )
    add_old_name(run, warmup, "--warmup")
    run.add_argument("--steps", type=positive_int, default=5, help="timed steps per run")
    run.add_argument("--repeats", type=positive_int, default=3, help="runs (alternating with the peer's)")
    run.add_argument(
        "--dtype",
        choices=("float32", "float64", "bfloat16"),
        default="float32",
        help="bfloat16 (GPU, LoRA): a bf16 base and activations under float32 adapters and optimiser state "
        "(smollm2's peer: a bf16 base under PEFT's float32 adapter); float64: the GPT presets only",
    )
    run.add_argument("--seed", type=non_negative_int, default=0)
    run.add_argument(
        "--corpus",
        default="shakespeare_modern",
        help="batches from this corpus; 'random' for uniform random tokens",
    )
    run.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads: the batch is split into this many shards, one per thread; "
        "default: $MINILORA_CPU_THREADS or the cores this process may use",
    )
    run.add_argument(
        "--peak-size",
        type=positive_int,
        default=None,
        help="n of the n x n matmul that measures the peak (default 2048 on cpu, 8192 on cuda)",
    )
    run.add_argument("--no-trace-memory", action="store_true", help="skip the extra tracemalloc step")
    add_quantized_flag(run, "smollm2 only: QLoRA, the frozen matrices in blocks")
    add_memory_flags(run, "smollm2 only")
    run.add_argument(
        "--tf32",
        action="store_true",
        help="on a GPU, float32 products on TF32 tensor cores, for minilora and the peer (not the default)",
    )
    run.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="on a GPU, launch every kernel from Python instead of replaying a captured CUDA graph",
    )
    run.add_argument(
        "--reference",
        action="store_true",
        help="time the reference layers and train_step (what a student reads) instead of the fast path",
    )
    peer = parser.add_argument_group("peer")
    peer.add_argument(
        "--peer",
        choices=("none", "torch"),
        default="none",
        help="torch: time the PyTorch peer (minilora.lab.torch_peer) in the same run",
    )
    peer.add_argument("--peer-threads", type=positive_int, default=2, help="torch.set_num_threads")
    peer.add_argument(
        "--peer-attention",
        choices=("math", "sdpa"),
        default="math",
        help="math: explicit full T x T softmax attention, as minilora (for smollm2 transformers' eager); "
        "sdpa: F.scaled_dot_product_attention (causal kernel)",
    )
    peer.add_argument(
        "--peer-autocast",
        choices=("none", "bfloat16"),
        default="none",
        help="bfloat16: the peer's forward under torch.autocast (bf16 products, float32 master weights)",
    )
    peer.add_argument(
        "--peer-compile", action="store_true", help="the peer's forward through torch.compile (gpt2 presets)"
    )
    parser.add_argument("--out", default=None, help="also append the JSON line to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="cpu (NumPy) or cuda (CuPy); default: $MINILORA_DEVICE, else cpu",
    )
    parser.set_defaults(run=run_bench_command)


def settings_from_args(args):
    """The BenchSettings the flags describe, for any preset (each preset's kind refuses what it cannot time)."""
    from ..lab.bench import BenchSettings, preset_kind

    default_targets = ",".join(preset_kind(args.preset).lora_config.target_modules)
    return BenchSettings(
        preset=args.preset,
        lora_config=lora_config_from_args(args, default_targets),
        device=args.device,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup=args.warmup,
        steps=args.steps,
        repeats=args.repeats,
        seed=args.seed,
        dtype=args.dtype,
        corpus=None if args.corpus == "random" else args.corpus,
        peer=None if args.peer == "none" else args.peer,
        peer_threads=args.peer_threads,
        peer_attention=args.peer_attention,
        peer_autocast=None if args.peer_autocast == "none" else args.peer_autocast,
        peer_compile=args.peer_compile,
        threads=args.threads,
        peak_size=args.peak_size,
        trace_memory=not args.no_trace_memory,
        cuda_graph=not args.no_cuda_graph,
        tf32=args.tf32,
        reference=args.reference,
        quantized=args.quantized,
        gradient_checkpointing=args.gradient_checkpointing,
        loss_chunk_rows=args.loss_chunk_rows,
    )


def corpus_read(args) -> list:
    """(flag, path) of the corpus files bench reads, none for random tokens: --out appends to none of them."""
    from ..io.data import corpus_files

    return [] if args.corpus == "random" else [("--corpus", path) for path in corpus_files(args.corpus)]


def run_bench_command(args) -> None:
    from ..io.run_folder import refuse_output_over_inputs
    from ..lab.bench import run_bench

    if args.out:  # before the timing: the file it appends to must not be the corpus it reads
        refuse_output_over_inputs(args.out, corpus_read(args))
    log = None if args.quiet else (lambda message: print(f"bench: {message}", file=sys.stderr, flush=True))
    result = run_bench(settings_from_args(args), log=log)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            out.write(line + "\n")


def register(subparsers) -> None:
    add_bench_parser(subparsers)


def main(argv=None) -> int:
    """``python -m minilora.cli.bench_command ...``: the same as ``minilora bench ...``."""
    parser = argparse.ArgumentParser(prog="minilora")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    from ..backend import BackendError

    try:
        args.run(args)
    except (BackendError, ValueError, KeyError, RuntimeError) as err:
        print(f"minilora bench: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
