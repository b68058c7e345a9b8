"""The data-parallel step for this model's device: MPI on CPUs, NCCL on GPUs (``fast.accelerate`` calls it)."""

from __future__ import annotations

import numpy as np

from .world import World


def distributed_step(
    model, optimizer, grad_clip: float, world: World, graph_warmup: int = 2, grad_accum: int = 1
):
    """``MpiStep`` for a NumPy model, ``NcclGraphedStep`` (one GPU per rank) for a CuPy one."""
    if model.xp is np:
        from .mpi_step import MpiStep

        return MpiStep(world, optimizer.names, grad_accum)
    from ..cuda import use_cublas
    from ..cuda.graph import can_capture
    from .nccl_step import NcclGraphedStep

    if not can_capture(model):
        raise ValueError(
            "the multi-GPU step is a CUDA graph, which cannot hold dropout: train with dropout 0"
        )
    use_cublas()  # the model lives on the current GPU already: one GPU per rank is chosen before it is built
    return NcclGraphedStep(model, optimizer, grad_clip, world, warmup=graph_warmup, grad_accum=grad_accum)
