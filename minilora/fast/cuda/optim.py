"""The optimiser's update and gradient clipping on the GPU, each in a couple of kernel launches.

``fused_adamw_step(optimizer, grads, lr)`` does what ``optimizer.step(grads, lr)`` of a reference
``minilora.optim.AdamW`` does, with one launch for every tensor (kernels/adamw.py) instead of about
a dozen per tensor, on the optimiser's own state buffers: checkpoints and the step count are the
reference's. ``fused_clip_grad_norm`` is ``minilora.optim.clip_grad_norm`` with the global norm in two
launches (kernels/grad_norm.py); its table of pointers is uploaded from the host, which a CUDA graph
capture forbids, so it runs after the graph. ``fused_apply_update`` is the two together: the second
half of a step (training/step.py) on a GPU.
"""

from __future__ import annotations

from ...optim import AdamW, scale_to_norm
from .kernels.adamw import adamw_step_fused
from .kernels.grad_norm import global_grad_norm


def fused_adamw_step(optimizer: AdamW, grads: dict, lr: float | None = None) -> None:
    """One AdamW update of ``optimizer``'s parameters in one launch (CuPy arrays of one dtype)."""
    lr, t = optimizer.begin_step(grads, lr)
    names = optimizer.names
    adamw_step_fused(
        [optimizer.params[name] for name in names],
        [grads[name] for name in names],
        [optimizer.buffer("exp_avg", name) for name in names],
        [optimizer.buffer("exp_avg_sq", name) for name in names],
        [lr * optimizer.lr_scale.get(name, 1.0) for name in names],
        [name in optimizer.decay_names for name in names],
        optimizer.beta1,
        optimizer.beta2,
        optimizer.eps,
        optimizer.weight_decay,
        t,
    )


def optimizer_step(optimizer, grads: dict, lr: float | None = None) -> None:
    """The fused update for a reference AdamW; any other optimiser takes its own step."""
    if type(optimizer) is AdamW:
        fused_adamw_step(optimizer, grads, lr)
    else:
        optimizer.step(grads, lr)


def fused_apply_update(optimizer, grads: dict, lr: float | None, grad_clip: float) -> None:
    """``training.step.apply_update`` in fused kernels: the global-norm clipping, then the update."""
    if grad_clip > 0:
        fused_clip_grad_norm(grads, grad_clip)
    optimizer_step(optimizer, grads, lr)


def fused_clip_grad_norm(grads: dict, max_norm: float):
    """Scale every gradient so that the global norm is at most ``max_norm``; returns the norm (device scalar)."""
    arrays = list(grads.values())
    total_norm = global_grad_norm(arrays)
    scale_to_norm(arrays, total_norm, max_norm)
    return total_norm
