"""The fast path: specialised layer functions and training steps, handed to the reference from above.

The reference (the layers, the model, LoRA, the optimiser, the training loop, generation) is plain
array code that never imports this package. It names two seams, and this package plugs into both:

- ``model.ops``, the namespace of layer functions a model calls (``minilora.layers.ops``): on the CPU
  ``cpu.ops.CPU_OPS`` (the same formulas in fewer passes over memory), on a GPU
  ``cuda.ops.CUDA_OPS`` (fused kernels);
- ``train_loop(..., step=...)``, the callable that does one batch's work: on the CPU
  ``cpu.sharded_step.sharded_train_step`` (the batch split across cores), on a GPU
  ``cuda.graph.GraphedStep`` (the step replayed as a CUDA graph) or, with dropout,
  ``cuda.graph.cuda_train_step``.

``accelerate(model, optimizer, grad_clip)`` makes both choices for the model's device and returns the
step. Every fast variant is tested against the reference it replaces.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from ..layers import LayerOps


def fast_ops(xp) -> LayerOps:
    """The fast layer functions for arrays of ``xp`` (numpy or cupy)."""
    if xp is np:
        from .cpu.ops import CPU_OPS

        return CPU_OPS
    from .cuda.ops import CUDA_OPS

    return CUDA_OPS


def accelerate(
    model,
    optimizer,
    grad_clip: float,
    shards: int | None = None,
    cuda_graph: bool = True,
    graph_warmup: int = 2,
):
    """Hand ``model`` its device's fast layer functions and return the fast ``step`` for ``train_loop``.

    CPU: ``shards`` threads (None: one per core). GPU: a CUDA graph captured after ``graph_warmup``
    eager steps, unless ``cuda_graph`` is False or the model has dropout. The step is bound to this
    model, optimiser and clip: make a new one when any of them changes.
    """
    model.ops = fast_ops(model.xp)
    if model.xp is np:
        from .cpu.host_memory import retain_freed_memory
        from .cpu.sharded_step import sharded_train_step

        retain_freed_memory()  # reuse last step's freed activations instead of fresh, zero-filled pages
        return sharded_train_step if shards is None else partial(sharded_train_step, shards=shards)
    from .cuda import use_cublas
    from .cuda.graph import GraphedStep, can_capture, cuda_train_step
    from .cuda.kernels.dequantize import fuse_dequantizers

    use_cublas()
    fuse_dequantizers(model)  # a quantized base's blocks decoded in one kernel per slab
    if cuda_graph and can_capture(model):
        return GraphedStep(model, optimizer, grad_clip, warmup=graph_warmup)
    return cuda_train_step
