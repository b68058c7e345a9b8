"""Evaluation and sampling on the CPU under training's thread policy: fast layer functions, one-threaded BLAS.

A training step (sharded_step.py) runs each shard in its own thread with a one-threaded BLAS, because
OpenBLAS spreading one product over the cores costs more in synchronisation than the small products
of these models repay, and much more on a busy machine, where its threads spin waiting for a core
another process holds. ``eval`` and ``generate`` call the model's forward alone; without this policy
they ran with OpenBLAS's default (a thread per core) and the reference layer functions.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from .host_memory import retain_freed_memory
from .ops import CPU_OPS
from .sharded_step import _blas_controller

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def use_one_blas_thread() -> int:
    """From now on in this process, BLAS uses one thread, unless the environment sets a count; returns it.

    For a Jupyter kernel (each notebook's first cell calls it): the kernel starts with OpenBLAS's
    default, a thread per core, for every product a training step leaves to it (the evaluations,
    the merges), and two threads on two busy cores wait for each other. ``notebooks/build.py`` sets
    the same through the environment; a kernel opened from Jupyter has none of it.
    """
    if not any(name in os.environ for name in BLAS_THREAD_VARIABLES):
        _blas_controller().limit(limits=1, user_api="blas")  # kept: the limit is never restored
    return min(info["num_threads"] for info in _blas_controller().info() if info["user_api"] == "blas")


@contextmanager
def one_blas_thread():
    """Within the block (or the decorated function), BLAS uses one thread, as in a training shard."""
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


@contextmanager
def cpu_inference(model):
    """Within the block, ``model`` (on the CPU) uses ``CPU_OPS`` and BLAS one thread; a no-op elsewhere.

    The model keeps ``CPU_OPS`` afterwards (the same numbers, checked in tests/test_fast_cpu_ops.py).
    """
    if model.xp is not np:
        yield model
        return
    model.ops = CPU_OPS
    retain_freed_memory()
    with one_blas_thread():
        yield model
