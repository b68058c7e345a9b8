"""One training step's forward and backward, with the batch split across the CPU's cores.

NumPy runs element-wise work (GELU, softmax, layernorm, the residual adds) on one core, and OpenBLAS
spreads a single matrix product over all cores only at a cost in synchronisation that small and
batched products (the per-head attention ones) do not repay. So on the CPU minilora does what a
multi-GPU trainer does across devices, across cores instead: the batch of B sequences is cut into
``shards`` slices along the batch axis, each slice runs the model's forward and backward in its own
thread with a one-threaded BLAS, and the gradients are summed. NumPy's ufuncs and BLAS calls release
Python's GIL, so the threads really run at the same time; the model's forward and backward are pure
functions of their inputs (the caches are returned, not stored), so the threads share nothing but
the read-only weights.

The arithmetic is unchanged. The loss is a mean over all B T positions, so a shard of B_i sequences
contributes B_i / B of it: its backward is seeded with dloss = B_i / B, and the summed gradients
equal the one-piece backward's up to float rounding (a test checks this in float64).

On a GPU, and with one shard, the step runs in one piece. Dropout masks are drawn per shard from
(seed, stream, step, shard) when there are several shards, so results with dropout depend on the
shard count, as they would on the number of GPUs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np

from ...backend import device_rng

THREADS_ENV_VAR = "MINILORA_CPU_THREADS"


def cpu_threads() -> int:
    """Worker threads for a CPU step: $MINILORA_CPU_THREADS if set, else the cores this process may use."""
    value = os.environ.get(THREADS_ENV_VAR)
    if value is not None:
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"${THREADS_ENV_VAR} must be a positive integer, got {value!r}")
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minilora-shard")


@cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController  # scans the loaded BLAS libraries once

    return ThreadpoolController()


def shard_bounds(batch_size: int, shards: int) -> list[tuple[int, int]]:
    """(start, stop) rows of each shard: as equal as possible, none empty (at most batch_size shards)."""
    shards = max(1, min(shards, batch_size))
    edges = np.linspace(0, batch_size, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def forward_backward(model, x, y, dropout_key: tuple[int, ...] | None = None, shards: int | None = None):
    """Loss and gradients of one batch.   x, y: (B, T) token ids -> (loss 0-d array, grads dict).

    ``dropout_key`` (e.g. (seed, DROPOUT_STREAM, step)) seeds the dropout masks; None means no
    dropout. ``shards`` defaults to ``cpu_threads()`` for a model on the CPU and to 1 on a GPU.
    """
    xp = model.xp
    if shards is None:
        shards = cpu_threads() if xp is np else 1
    bounds = shard_bounds(x.shape[0], shards)
    if len(bounds) == 1:
        rng = None if dropout_key is None else device_rng(xp, *dropout_key)
        _, loss, cache = model.forward(x, y, dropout_rng=rng)
        return loss, model.backward(cache)

    B = x.shape[0]

    def run_shard(shard: int):
        start, stop = bounds[shard]
        rng = None if dropout_key is None else device_rng(xp, *dropout_key, shard)
        _, loss, cache = model.forward(x[start:stop], y[start:stop], dropout_rng=rng)
        weight = (stop - start) / B  # this shard's share of the mean over the whole batch
        return loss * weight, model.backward(cache, dloss=weight)

    with _blas_controller().limit(limits=1, user_api="blas"):  # one core per shard
        results = list(_pool(len(bounds)).map(run_shard, range(len(bounds))))
    loss, grads = results[0]
    for shard_loss, shard_grads in results[1:]:
        loss = loss + shard_loss
        for name, grad in shard_grads.items():
            grads[name] += grad
    return loss, grads
