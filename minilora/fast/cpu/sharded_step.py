"""A CPU training step with the batch split across the cores: the fast path's ``step`` for the CPU.

NumPy runs element-wise work (GELU, softmax, layernorm, the residual adds) on one core, and OpenBLAS
spreads a single matrix product over all cores only at a cost in synchronisation that small and
batched products (the per-head attention ones) do not repay. So on the CPU minilora does what a
multi-GPU trainer does across devices, across cores instead: the batch of B sequences is cut into
``shards`` slices along the batch axis, each slice runs the model's forward and backward in its own
thread with a one-threaded BLAS, and the gradients are summed. NumPy's ufuncs and BLAS calls release
Python's GIL, so the threads really run at the same time; the model's forward and backward are pure
functions of their inputs (the caches are returned, not stored), so the threads share nothing but
the read-only weights.

The arithmetic is unchanged. The loss is a mean over the batch's n scored targets, so a shard with
n_i of them contributes n_i / n of it (B_i / B when every target is scored): its backward is seeded
with dloss = n_i / n (``training.step.share_of_scored``), and the summed gradients equal the
one-piece backward's up to float rounding (a test checks this in float64).

With one shard the step is the reference ``train_step``. Dropout masks are drawn per shard from
(seed, stream, step, shard) when there are several shards, so results with dropout depend on the
shard count, as they would on the number of GPUs. The split replaces the first half of the step
(training/step.py); ``sharded_train_step()`` is the ``TrainingStep`` with it and the reference
update, which ``training.loop.train_loop(..., step=...)`` runs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

from ...backend import device_rng
from ...training.step import (
    TrainingStep,
    apply_update,
    forward_backward,
    rows_of,
    share_of_scored,
    split_bounds,
)

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


def sharded_forward_backward(
    model, x, y, dropout_key: tuple[int, ...] | None, bounds, dloss: float = 1.0, positions=None
):
    """Loss and summed gradients of the shards ``bounds`` of one batch, one thread each.

    x, y: (B, T) token ids, positions (B, T) or None -> (loss 0-d array, grads dict), the same as
    one piece up to rounding: the first half of a step (``training.step.forward_backward``), dloss included.
    """
    xp = model.xp

    def run_shard(shard: int):
        start, stop = bounds[shard]
        rng = None if dropout_key is None else device_rng(xp, *dropout_key, shard)
        loss, cache = model.forward(
            x[start:stop], y[start:stop], dropout_rng=rng, positions=rows_of(positions, start, stop)
        )[1:]  # the logits are freed now
        weight = share_of_scored(y, start, stop)  # this shard's share of the mean over the whole batch
        return loss * weight, model.backward(cache, dloss=dloss * weight)

    with _blas_controller().limit(limits=1, user_api="blas"):  # one core per shard
        results = list(_pool(len(bounds)).map(run_shard, range(len(bounds))))
    loss, grads = results[0]
    for shard_loss, shard_grads in results[1:]:
        loss = loss + shard_loss
        for name, grad in shard_grads.items():
            grads[name] += grad
    return loss, grads


class ShardedForwardBackward:
    """The first half of a CPU step with the batch cut into ``shards`` threads (None: one per core).

    A batch too small to split runs the reference half.
    """

    def __init__(self, shards: int | None = None):
        self.shards = shards

    def __call__(self, model, x, y, dropout_key=None, dloss: float = 1.0, positions=None):
        bounds = split_bounds(x.shape[0], cpu_threads() if self.shards is None else self.shards)
        if len(bounds) == 1:
            return forward_backward(model, x, y, dropout_key, dloss, positions)
        return sharded_forward_backward(model, x, y, dropout_key, bounds, dloss, positions)


def sharded_train_step(shards: int | None = None, grad_accum: int = 1) -> TrainingStep:
    """The CPU's ``step`` for ``train_loop``: the sharded first half, the reference update."""
    return TrainingStep(ShardedForwardBackward(shards), apply_update, grad_accum)
