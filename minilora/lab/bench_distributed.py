"""Step time of the MPI data-parallel step at N ranks, and communication's share, LoRA against full.

Run under the launcher, one rank per core, the same global batch at every N (strong scaling):

    mpirun -n 4 python -m minilora.lab.bench_distributed --preset small --batch-size 16 --steps 8

Rank 0 prints one JSON line per mode (lora, full): the median step time and its spread over the
timed steps, the median time inside the exchange (the Allgather and the rank-ordered sum, waiting
for the slowest rank included), the same exchange timed alone after a barrier (the transfer itself),
and the bytes each rank sends per step. Efficiency at N ranks is t(1) / (N t(N)) from the lines of
runs at 1 and at N.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from ..config import get_preset
from ..fast.cpu.ops import CPU_OPS
from ..fast.distributed.mpi_step import MpiStep
from ..fast.distributed.world import current_world
from ..lora.config import LoraConfig
from ..lora.model import add_lora
from ..model import GPT, init_params
from ..optim import AdamW


def measure(mode: str, preset: str, batch_size: int, steps: int, warmup: int, r: int) -> dict:
    """One mode's timings on this rank (rank 0's are the ones reported)."""
    world = current_world()
    config = get_preset(preset)
    model = GPT(config, init_params(config, seed=0))
    if mode == "lora":
        model = add_lora(model, LoraConfig(r=r), seed=0)
    model.ops = CPU_OPS
    optimizer = AdamW(model.params, model.trainable_names, lr=1e-4, no_decay=model.no_decay)
    step = MpiStep(world, optimizer.names)
    rng = np.random.default_rng(0)
    step_times, comm_times = [], []
    for index in range(warmup + steps):
        x = rng.integers(
            0, config.vocab_size, (batch_size, config.block_size)
        )  # (B, T), the same on every rank
        y = rng.integers(0, config.vocab_size, (batch_size, config.block_size))
        if world.comm is not None:
            world.comm.Barrier()  # every rank starts the step together
        comm_before, started = step.comm_seconds, time.perf_counter()
        step(model, optimizer, x, y, 1e-4, 1.0)
        if index >= warmup:
            step_times.append(time.perf_counter() - started)
            comm_times.append(step.comm_seconds - comm_before)
    transfer_times = []
    own, gathered = step.buffers
    for _ in range(steps):  # the exchange alone: no rank waits for another's backward
        if world.comm is not None:
            world.comm.Barrier()
        started = time.perf_counter()
        step.exchange(own, gathered)
        transfer_times.append(time.perf_counter() - started)
    step_median = statistics.median(step_times)
    return {
        "mode": mode,
        "preset": preset,
        "ranks": world.size,
        "batch_size": batch_size,
        "trainable": int(own.size - 1),
        "bytes_sent_per_step": step.bytes_sent,
        "step_seconds": step_median,
        "step_seconds_min": min(step_times),
        "step_seconds_max": max(step_times),
        "comm_seconds": statistics.median(comm_times),
        "comm_share": statistics.median(comm_times) / step_median,
        "transfer_seconds": statistics.median(transfer_times),
        "transfer_share": statistics.median(transfer_times) / step_median,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch, split over the ranks")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (on c_attn)")
    parser.add_argument("--modes", default="lora,full")
    args = parser.parse_args(argv)
    for mode in args.modes.split(","):
        row = measure(mode, args.preset, args.batch_size, args.steps, args.warmup, args.r)
        if current_world().is_writer:
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
