"""The GPU fast path: fused kernels, cuBLAS through our own handle, and the training step as a CUDA graph.

- ``ops.CUDA_OPS``: the layer namespace a model on a GPU is handed (fused GELU, LayerNorm, attention,
  cross-entropy; see kernels/).
- ``blas``: cuBLAS products through a handle of our own, which a CUDA graph can record;
  ``use_cublas()`` routes ``minilora.backend.matmul`` of CuPy arrays through it.
- ``optim``: AdamW's update and gradient clipping in a couple of launches each.
- ``graph``: ``GraphedStep``, a training step captured once and replayed, and ``cuda_train_step``,
  the same work launched eagerly (for dropout, which a graph cannot replay).

Importing this package never imports CuPy; ``minilora.fast.accelerate`` wires it in for a model on a GPU.
"""

from __future__ import annotations

from ...backend import register_matmul
from . import blas


def use_cublas() -> None:
    """Send every ``minilora.backend.matmul`` of CuPy arrays through ``blas.product`` (idempotent)."""
    register_matmul("cupy", blas.product)
