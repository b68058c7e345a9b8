"""Where a GPU training step's time goes: kernel time per step, by kernel, over graph replays.

    PYTHONPATH=. python docs/benchmarks/gpu_kernel_profile.py --model gpt2s --dtype float32
    PYTHONPATH=. python docs/benchmarks/gpu_kernel_profile.py --model smollm2-shape --dtype bfloat16 \
        --batch 16 --seq 512

A LoRA step (r = 8: GPT-2's c_attn and attn.c_proj, the Llama's q_proj and v_proj) on the fast path
(``minilora.fast.accelerate``: the fused kernels, the step captured as a CUDA graph), warmed up, then
three replays recorded by ``torch.profiler`` (CUPTI sees every kernel of the process, CuPy's too; torch
is only the profiler here). "smollm2-shape" is a Llama of SmolLM2-135M's shape with random weights:
the time of a step does not depend on the weights' values, and no model file is needed. Prints the
kernel time of one step and its largest kernels, with their launches per step.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from minilora.backend import float_dtype, host_rng, synchronize
from minilora.config import get_preset
from minilora.fast import accelerate
from minilora.jobs.finetune import make_optimizer
from minilora.llama import Llama, LlamaConfig, init_llama_params
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.training.loop import TrainSettings

REPLAYS = 3


def smollm2_shape(block_size: int) -> LlamaConfig:
    """SmolLM2-135M's architecture (io/smollm2.py reads the same numbers from its GGUF file)."""
    return LlamaConfig(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, ffn_hidden=1536, vocab_size=49152,
                       block_size=block_size, rope_theta=100000.0)  # fmt: skip


def build(model_name: str, seq: int):
    if model_name == "smollm2-shape":
        config = smollm2_shape(seq)
        base = Llama(config, init_llama_params(config, seed=0, device="cuda"))
        return add_lora(base, LoraConfig(r=8, lora_alpha=16.0, target_modules=("q_proj", "v_proj")), seed=0)
    config = get_preset(model_name)
    base = GPT(config, init_params(config, seed=0, device="cuda"))
    return add_lora(base, LoraConfig(r=8, target_modules=("c_attn", "attn.c_proj")), seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gpt2s", help="a GPT preset, or smollm2-shape")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()

    import cupy
    from torch.profiler import ProfilerActivity, profile

    model = build(args.model, args.seq)
    if args.dtype == "bfloat16":
        model.cast_base(float_dtype("bfloat16"))  # the frozen base in bf16, the adapter in float32
    optimizer = make_optimizer(model, TrainSettings(lr=1e-3, weight_decay=0.0))
    step = accelerate(model, optimizer, grad_clip=1.0, graph_warmup=1)
    rng = host_rng(1)
    vocab = model.config.vocab_size
    x, y = rng.integers(0, vocab, (args.batch, args.seq)), rng.integers(0, vocab, (args.batch, args.seq))
    for _ in range(3):  # the eager warm-up, the capture, one replay
        step(model, optimizer, x, y, 1e-3, 1.0, None)
    synchronize(cupy)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            step(model, optimizer, x, y, 1e-3, 1.0, None)
        synchronize(cupy)
    per_kernel = defaultdict(lambda: [0.0, 0])  # name -> [microseconds, launches], over the replays
    for event in prof.events():
        if event.device_type.name == "CUDA":
            per_kernel[event.name][0] += event.device_time_total
            per_kernel[event.name][1] += 1
    total_ms = sum(us for us, _ in per_kernel.values()) / REPLAYS / 1e3
    launches = sum(n for _, n in per_kernel.values()) / REPLAYS
    print(f"{args.model} {args.dtype} B {args.batch} T {args.seq}: {total_ms:.2f} ms of kernels a step, "
          f"{launches:.0f} launches")  # fmt: skip
    for name, (us, n) in sorted(per_kernel.items(), key=lambda item: -item[1][0])[: args.top]:
        print(f"{us / REPLAYS / 1e3:8.3f} ms {n / REPLAYS:6.0f}x  {name[:100]}")


if __name__ == "__main__":
    main()
