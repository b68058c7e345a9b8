"""The GPU fast path: fused kernels, cuBLAS through our own handle, and the training step as a CUDA graph.

Each piece replaces one part of the reference on a GPU and is tested against it: the layer and
adapter namespaces a model is handed (``ops.CUDA_OPS``, ``ops.CUDA_LORA_OPS``), the step's second
half (``optim``), its first half replayed as a graph (``graph``), and generation (``decode``).
Importing this package never imports CuPy; ``minilora.fast.accelerate`` wires it in for a model on
a GPU, and ``use_cublas()`` below routes ``minilora.backend.matmul`` of CuPy arrays through ``blas``.

Reading order:

    ops.py     CUDA_OPS and CUDA_LORA_OPS: the reference namespaces with the fused pairs swapped in
    kernels/   the fused CuPy kernels, a file per layer or optimiser piece (its own reading order)
    linear.py  the reference's linear layer, with the bias added by one vectorised kernel
    lora.py    LoRA's layer with its scale and adds folded into cuBLAS products
    blas.py    cuBLAS through a handle of our own, so that a CUDA graph can record the products
    optim.py   AdamW's update and gradient clipping in a couple of launches each
    graph.py   GraphedStep, the step's first half captured once and replayed, and cuda_train_step,
               the same work launched eagerly (for dropout, which a graph cannot replay)
    decode.py  generation with the one-token step replayed as a CUDA graph and sampling on the device
"""

from __future__ import annotations

from ...backend import register_matmul
from . import blas


def use_cublas() -> None:
    """Send every ``minilora.backend.matmul`` of CuPy arrays through ``blas.product`` (idempotent)."""
    register_matmul("cupy", blas.product)
