"""Tokens per second of generation: minilora's reference, minilora's fast decoder and PyTorch eager.

All three generate from the same model and weights (the shipped base unless another is given), on
one device, greedy and sampled (temperature 0.8), B rows of a short prompt extended to fill the
block exactly, so that no side rebuilds its cache. The PyTorch peer (``torch_peer.TorchGPT.generate``)
keeps its own key/value cache, attends with ``F.scaled_dot_product_attention`` and samples with
``torch.multinomial`` on the device, eager (nothing compiled, no CUDA graph), the way a PyTorch user
writes a cached decoding loop. Each time is the median of ``repeats`` runs after a warm-up run.

Greedy decoding is also compared token by token: minilora's two decoders must agree with each
other exactly, and with PyTorch up to the first near-tie that float32 rounding breaks differently.

    python -m minilora.lab.generation_bench --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import numpy as np

from ..backend import resolve_device, synchronize, to_numpy
from ..fast import accelerate_generation
from ..generate import generate_ids
from ..io.checkpoint import load_model
from ..io.data import SHIPPED_BASE
from ..io.tokenizer import encode


def median_seconds(run, repeats: int, xp) -> float:
    """Median wall seconds of run() over ``repeats`` calls, after one warm-up call, device work included."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(xp)
        started = time.perf_counter()
        run()
        synchronize(xp)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def agreeing_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading columns of two (B, T) id arrays are equal in every row."""
    differ = np.flatnonzero((a != b).any(axis=0))
    return int(differ[0]) if differ.size else a.shape[1]


def bench_generation(
    device: str = "cuda",
    base_path=SHIPPED_BASE,
    batch_size: int = 1,
    repeats: int = 3,
    prompt: str = "KING.\n",
) -> dict:
    """tokens/s of each decoder, greedy and sampled, and the greedy agreement; see the module docstring."""
    from . import torch_peer

    device = resolve_device(device)
    model = load_model(base_path, device)
    config = model.config
    prompt_ids = np.tile(np.asarray(encode(prompt), dtype=np.int64), (batch_size, 1))  # (B, T0)
    new = config.block_size - prompt_ids.shape[1]  # fills the block: no cache rebuild on any side
    spec = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size")}
    peer = torch_peer.TorchGPT(
        spec, {name: to_numpy(value) for name, value in model.params.items()}, trainable=(), device=device
    )
    torch_peer.configure(threads=1, device=device)  # float32 products on both sides (no TF32)
    fast = accelerate_generation(model)
    decoders = {
        "minilora reference": lambda t: generate_ids(model, prompt_ids, new, t, None, seed=0),
        "minilora fast": lambda t: fast(model, prompt_ids, new, t, None, seed=0),
        "pytorch eager": lambda t: peer.generate(prompt_ids, new, t, seed=0),
    }
    results = {"device": device, "batch_size": batch_size, "new_tokens": new, "fast_decoder": fast.__name__}
    for mode, temperature in (("greedy", 0.0), ("sampled", 0.8)):
        for name, run in decoders.items():
            seconds = median_seconds(partial(run, temperature), repeats, model.xp)
            results[f"{name}, {mode}"] = {"seconds": seconds, "tokens_per_s": batch_size * new / seconds}
    greedy = {name: run(0.0)[:, prompt_ids.shape[1] :] for name, run in decoders.items()}
    results["greedy tokens equal, reference vs fast"] = agreeing_prefix(
        greedy["minilora reference"], greedy["minilora fast"]
    )
    results["greedy tokens equal, fast vs pytorch"] = agreeing_prefix(
        greedy["minilora fast"], greedy["pytorch eager"]
    )
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    results = bench_generation(args.device, batch_size=args.batch_size, repeats=args.repeats)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
