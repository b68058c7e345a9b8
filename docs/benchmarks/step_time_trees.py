"""A LoRA training step's wall time on a GPU, for comparing two trees of minilora in one session.

    PYTHONPATH=. python docs/benchmarks/step_time_trees.py --model gpt2s --dtype bfloat16
    PYTHONPATH=OLD_TREE python docs/benchmarks/step_time_trees.py --model smollm2-shape --batch 16 --seq 512

The fast path's step (``minilora.fast.accelerate``: fused kernels, the step captured as a CUDA graph)
for a LoRA adapter (r = 8: GPT-2's c_attn and attn.c_proj, the Llama's q_proj and v_proj) over a bf16
or float32 base, warmed up, then ``--repeats`` runs of ``--steps`` steps, each timed between two
device synchronisations. Prints one JSON line: the median step time of each run in milliseconds.
It uses only what the trees compared share (gpu_kernel_profile.build's models, make_optimizer,
accelerate), so the same script times a tree before and after a change; alternate the two in one
session.
"smollm2-shape" is a Llama of SmolLM2-135M's shape with random weights: a step's time does not
depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from gpu_kernel_profile import build  # the same models as the kernel profile, beside this script

from minilora.backend import float_dtype, host_rng, synchronize
from minilora.fast import accelerate
from minilora.jobs.finetune import make_optimizer
from minilora.training.loop import TrainSettings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gpt2s", help="a GPT preset, or smollm2-shape")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="")
    args = parser.parse_args()

    import cupy

    model = build(args.model, args.seq)
    if args.dtype == "bfloat16":
        model.cast_base(float_dtype("bfloat16"))  # the frozen base in bf16, the adapter in float32
    optimizer = make_optimizer(model, TrainSettings(lr=1e-3, weight_decay=0.0))
    step = accelerate(model, optimizer, grad_clip=1.0)
    rng = host_rng(1)
    vocab = model.config.vocab_size
    x, y = rng.integers(0, vocab, (args.batch, args.seq)), rng.integers(0, vocab, (args.batch, args.seq))
    for _ in range(4):  # the eager warm-up steps, the capture, a replay
        step(model, optimizer, x, y, 1e-3, 1.0, None)
    synchronize(cupy)
    runs = []
    for _ in range(args.repeats):
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            loss = step(model, optimizer, x, y, 1e-3, 1.0, None)
            synchronize(cupy)
            times.append((time.perf_counter() - started) * 1e3)
        runs.append(statistics.median(times))
    print(json.dumps({"label": args.label, "model": args.model, "dtype": args.dtype, "batch": args.batch,
                      "seq": args.seq, "run_medians_ms": [round(t, 3) for t in runs],
                      "median_ms": round(statistics.median(runs), 3), "loss": float(loss)}))  # fmt: skip


if __name__ == "__main__":
    main()
