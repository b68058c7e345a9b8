"""The fast path: specialised layer functions and training steps, handed to the reference from above.

The reference (the layers, the model, LoRA, the optimiser, the training loop, generation) is plain
array code that never imports this package. It names three seams, and this package plugs into each:

- ``model.ops``, the namespace of layer functions a model calls (``minilora.layers.ops``): on the CPU
  ``cpu.ops.CPU_OPS`` (the same formulas in fewer passes over memory), on a GPU
  ``cuda.ops.CUDA_OPS`` (fused kernels); and an adapted model's ``model.lora_ops``, its adapter
  layer functions (``minilora.lora.ops``): on a GPU ``cuda.ops.CUDA_LORA_OPS`` (LoRA's scale and
  adds folded into the products), on the CPU the reference's. Both are handed in with
  ``model.use_layer_ops(...)``;
- ``train_loop(..., step=...)``, a ``training.step.TrainingStep`` that does one batch's work in two
  halves, each replaceable: on the CPU ``cpu.sharded_step.sharded_train_step`` (the first half split
  across cores), on a GPU ``cuda.graph.GraphedStep`` (the first half replayed as a CUDA graph, the
  second fused) or, with dropout, ``cuda.graph.cuda_train_step`` (the second half fused); under
  ``mpirun`` with several ranks, ``distributed.mpi_step.MpiStep`` (CPU) or
  ``distributed.nccl_step.NcclGraphedStep`` (GPU): the first half split across processes;
- ``generate(..., decoder=...)``, the function that extends a prompt's ids: on a GPU
  ``cuda.decode.cuda_generate_ids`` (the one-token step replayed as a CUDA graph, sampling on the
  device).

``accelerate(model, optimizer, grad_clip)`` makes the first two choices for the model's device
(``use_fast_layers`` the first alone) and returns the step; ``accelerate_generation(model)``
returns the decoder. Every fast variant is tested against the reference it replaces.

Reading order (this file first):

    cpu/          the CPU: the layer functions in fewer passes over memory, the batch split across cores
    cuda/         the GPU: fused kernels, cuBLAS through our own handle, the step as a CUDA graph, decoding
    distributed/  data parallel across processes under mpirun: MPI between CPUs, NCCL between GPUs
"""

from __future__ import annotations

import numpy as np

from ..layers import LayerOps
from ..lora.ops import REFERENCE_LORA_OPS, LoraOps


def fast_ops(xp) -> LayerOps:
    """The fast layer functions for arrays of ``xp`` (numpy or cupy)."""
    if xp is np:
        from .cpu.ops import CPU_OPS

        return CPU_OPS
    from .cuda.ops import CUDA_OPS

    return CUDA_OPS


def fast_lora_ops(xp) -> LoraOps:
    """The fast adapter layer functions for arrays of ``xp``: the GPU's, or the reference's on the CPU."""
    if xp is np:
        return REFERENCE_LORA_OPS
    from .cuda.ops import CUDA_LORA_OPS

    return CUDA_LORA_OPS


def use_fast_layers(model) -> None:
    """Hand ``model`` its device's fast layer functions: ``model.ops``, and an adapted model's ``lora_ops``."""
    model.use_layer_ops(fast_ops(model.xp), fast_lora_ops(model.xp))


def accelerate(
    model,
    optimizer,
    grad_clip: float,
    shards: int | None = None,
    cuda_graph: bool = True,
    graph_warmup: int = 2,
    grad_accum: int = 1,
):
    """Hand ``model`` its device's fast layer functions and return the fast ``step`` for ``train_loop``.

    CPU: ``shards`` threads (None: one per core). GPU: a CUDA graph captured after ``graph_warmup``
    eager steps, unless ``cuda_graph`` is False or the model has dropout. Started by ``mpirun`` with
    several ranks (distributed/world.py), the step is data parallel over them instead. Every step
    accumulates ``grad_accum`` micro-batches (training/step.py). The step is bound to this model,
    optimiser and clip: make a new one when any of them changes.
    """
    use_fast_layers(model)
    from .distributed.world import current_world

    world = current_world()
    if world.size > 1:
        from .distributed.launch import distributed_step

        return distributed_step(model, optimizer, grad_clip, world, graph_warmup, grad_accum)
    if model.xp is np:
        from .cpu.host_memory import retain_freed_memory
        from .cpu.sharded_step import sharded_train_step

        retain_freed_memory()  # reuse last step's freed activations instead of fresh, zero-filled pages
        return sharded_train_step(shards, grad_accum)
    from .cuda import use_cublas
    from .cuda.graph import GraphedStep, can_capture, cuda_train_step
    from .cuda.kernels.dequantize import fuse_dequantizers

    use_cublas()
    fuse_dequantizers(model)  # a quantized base's blocks decoded in one kernel per slab
    if cuda_graph and can_capture(model):
        return GraphedStep(model, optimizer, grad_clip, warmup=graph_warmup, grad_accum=grad_accum)
    return cuda_train_step(grad_accum)


def accelerate_generation(model):
    """The ``decoder=`` for ``generate`` on the model's device: the GPU's for a GPT on a GPU, else the reference.

    ``cuda.decode.cuda_generate_ids`` takes a GPT, with or without a LoRA adapter, in float32 or
    float64; a Llama, a quantized base or a model on the CPU gets ``generate.generate_ids``.
    """
    from ..generate import generate_ids

    if model.xp is np:
        return generate_ids
    from .cuda.decode import can_decode, cuda_generate_ids

    return cuda_generate_ids if can_decode(model) else generate_ids
