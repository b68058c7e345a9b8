"""Where a training step's time goes: cProfile over a few steps, per layer function.

    python docs/benchmarks/profile_step.py --preset medium --steps 3            # LoRA r = 8, c_attn + attn.c_proj
    python docs/benchmarks/profile_step.py --preset medium --full --steps 2
    python docs/benchmarks/profile_step.py --preset medium --threads 1    # steadier on a busy machine

Prints one row per function of minilora's layers, model, LoRA and optimiser: its own time (NumPy's
element-wise work shows up here, since ufuncs are not profiled separately), the time of the matrix
products it asked for through ``backend.matmul``, and both as a share of the step. The profiler adds
a little overhead per Python call, which is small against these array sizes.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np

from minilora.backend import host_rng
from minilora.fast import fast_ops
from minilora.jobs.finetune import make_optimizer
from minilora.lab.bench import DEFAULT_LORA, BenchSettings
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.training.loop import DATA_STREAM, TrainSettings, train_step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--full", action="store_true")
    parser.add_argument(
        "--reference", action="store_true", help="the reference layers instead of the CPU fast path"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None, help="NumPy's BLAS threads (threadpoolctl)")
    args = parser.parse_args()
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.threads, user_api="blas")
    settings = BenchSettings(preset=args.preset, lora_config=None if args.full else DEFAULT_LORA, corpus=None)
    config, lora_config = settings.config(), settings.lora_config
    B, T = settings.batch_shape()
    model = GPT(config, init_params(config))
    if lora_config is not None:
        model = add_lora(model, lora_config)
    if not args.reference:
        model.ops = fast_ops(np)  # the CPU fast path's layer functions (the step stays in one piece here)
    optimizer = make_optimizer(model, TrainSettings(lr=settings.lr, weight_decay=settings.weight_decay))

    def batch(step):
        rng = host_rng(0, DATA_STREAM, step)
        return rng.integers(0, 256, (B, T)), rng.integers(0, 256, (B, T))

    train_step(model, optimizer, *batch(0), None, settings.grad_clip)  # warm-up, allocates AdamW's state
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for step in range(1, args.steps + 1):
        train_step(model, optimizer, *batch(step), None, settings.grad_clip)
    profiler.disable()
    wall = (time.perf_counter() - started) / args.steps

    stats = pstats.Stats(profiler)
    own, matmul_by_caller = {}, {}
    for (filename, _line, name), (_, _, tottime, _, callers) in stats.stats.items():
        if "minilora" not in filename:
            continue
        short = f"{filename.split('minilora/')[-1]}:{name}"
        if name == "matmul" and filename.endswith("backend.py"):
            for (caller_file, _, caller_name), (_, _, caller_tottime, _) in callers.items():
                key = f"{caller_file.split('minilora/')[-1]}:{caller_name}"
                matmul_by_caller[key] = matmul_by_caller.get(key, 0.0) + caller_tottime
        else:
            own[short] = own.get(short, 0.0) + tottime
    rows = sorted(
        set(own) | set(matmul_by_caller), key=lambda k: -(own.get(k, 0) + matmul_by_caller.get(k, 0))
    )
    total = sum(own.values()) + sum(matmul_by_caller.values())
    mode = "full" if args.full else f"LoRA r={lora_config.r} {','.join(lora_config.target_modules)}"
    print(f"{args.preset} {mode}, B={B} T={T}: {wall:.3f} s per step under the profiler, {args.steps} steps")
    print(f"{'function':<48} {'own s/step':>10} {'matmul s/step':>13} {'% of step':>9}")
    for key in rows[: args.top]:
        o, m = own.get(key, 0.0) / args.steps, matmul_by_caller.get(key, 0.0) / args.steps
        print(f"{key:<48} {o:>10.3f} {m:>13.3f} {100 * (o + m) * args.steps / total:>8.1f}%")
    matmul = sum(matmul_by_caller.values()) / args.steps
    print(f"{'all matmuls':<48} {'':>10} {matmul:>13.3f} {100 * matmul * args.steps / total:>8.1f}%")
    print(f"{'everything else (element-wise, copies, Python)':<48} {sum(own.values()) / args.steps:>10.3f}")


if __name__ == "__main__":
    main()
