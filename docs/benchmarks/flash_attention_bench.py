"""Time causal attention, forward and forward + backward, at the gpt2s shape: the flash kernels, the
cuBLAS attention they replace, and PyTorch's scaled_dot_product_attention as a peer.

    PYTHONPATH=. python docs/benchmarks/flash_attention_bench.py [--json out.jsonl]

Shape B 8, H 12, T 1024, hs 64. Each case: 3 warm-up calls, then 20 timed calls between CUDA events
on one stream; the table gives the median and [min, max] in milliseconds, and TFLOP/s counted the
usual way for causal attention (forward 2 B H T^2 hs: two products over half the (T, T) square;
forward + backward 3.5 times that), whatever work the implementation really does.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import numpy as np

B, H, T, HS = 8, 12, 1024, 64
WARMUP, REPEAT = 3, 20
FORWARD_FLOP = 2 * B * H * T * T * HS


def time_cupy(fn):
    import cupy

    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEAT):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return times


def time_torch(fn):
    import torch

    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEAT):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def cupy_cases():
    import cupy
    import ml_dtypes

    from minilora.fast.cuda.kernels import attention as fused
    from minilora.fast.cuda.kernels import flash_attention as flash

    default_route = fused.USE_FLASH
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((B, H, T, HS)).astype(np.float32) for _ in range(4)]
    qkv = cupy.asarray(rng.standard_normal((B, T, 3 * H * HS)).astype(np.float32))
    dy = cupy.asarray(rng.standard_normal((B, T, H * HS)).astype(np.float32))

    def bf16(x):
        x = x.astype(ml_dtypes.bfloat16)
        try:
            return cupy.asarray(x)
        except Exception:  # no bfloat16 dtype in this CuPy: its bit patterns
            return cupy.asarray(x.view(np.uint16))

    for name, make in (("float32", cupy.asarray), ("bf16", bf16)):
        q, k, v, do = (make(x) for x in host)
        yield f"flash {name}", "forward", lambda q=q, k=k, v=v: flash.flash_attention(q, k, v)

        def both(q=q, k=k, v=v, do=do):
            out, lse = flash.flash_attention(q, k, v)
            flash.flash_attention_backward(do, q, k, v, out, lse)

        yield f"flash {name}", "forward+backward", both

    def model_route(use_flash):
        def run():
            fused.USE_FLASH = use_flash
            y, cache = fused.attention_forward(qkv, H)
            fused.attention_backward(dy, cache)

        return run

    def model_forward(use_flash):
        def run():
            fused.USE_FLASH = use_flash
            fused.attention_forward(qkv, H)

        return run

    yield "CUDA_OPS flash float32 (qkv layout)", "forward", model_forward(True)
    yield "CUDA_OPS flash float32 (qkv layout)", "forward+backward", model_route(True)
    yield "CUDA_OPS cuBLAS float32 (old path)", "forward", model_forward(False)
    yield "CUDA_OPS cuBLAS float32 (old path)", "forward+backward", model_route(False)
    fused.USE_FLASH = default_route


def torch_cases():
    import torch
    import torch.nn.functional as F

    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        q, k, v, do = (torch.randn(B, H, T, HS, device="cuda", dtype=dtype) for _ in range(4))
        qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
        yield (
            f"torch sdpa {name}",
            "forward",
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        )

        def both(qg=qg, kg=kg, vg=vg, do=do):
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
            out.backward(do)

        yield f"torch sdpa {name}", "forward+backward", both


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="append one JSON line per case to this file")
    args = parser.parse_args()
    rows = []
    for cases, timer in ((cupy_cases, time_cupy), (torch_cases, time_torch)):
        try:
            for name, what, fn in cases():
                times = timer(fn)
                flop = FORWARD_FLOP * (1.0 if what == "forward" else 3.5)
                median = statistics.median(times)
                rows.append(
                    {
                        "case": name,
                        "pass": what,
                        "median_ms": median,
                        "min_ms": min(times),
                        "max_ms": max(times),
                        "tflops": flop / (median * 1e-3) / 1e12,
                        "shape": [B, H, T, HS],
                        "repeat": REPEAT,
                    }
                )
        except ImportError as error:
            print(f"skipped {cases.__name__}: {error}")
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(f"\ncausal attention, B {B} H {H} T {T} hs {HS}: median [min, max] of {REPEAT} calls")
    print(f"{'case':38s} {'pass':17s} {'ms':>8s} {'[min, max]':>18s} {'TFLOP/s':>8s}")
    for r in rows:
        spread = f"[{r['min_ms']:.3f}, {r['max_ms']:.3f}]"
        print(f"{r['case']:38s} {r['pass']:17s} {r['median_ms']:8.3f} {spread:>18s} {r['tflops']:8.1f}")
    assert all(math.isfinite(r["median_ms"]) for r in rows)


if __name__ == "__main__":
    main()
