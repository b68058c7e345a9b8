"""One optimiser step, split at its seam: the gradients of a batch, then the update they make.

    loss, grads = forward_backward(model, x, y, dropout_key)      the first half
    apply_update(optimizer, grads, lr, grad_clip)                 the second half

``train_step`` is the two together, in plain sight. Every faster step replaces one half and keeps the
other (``minilora.fast``): the batch split across CPU threads, across MPI ranks, or replayed as a CUDA
graph replaces the first; the fused clipping and AdamW kernels replace the second. A
``TrainingStep`` holds the two halves a run uses, and is where gradient accumulation lives, once, for
every pair of halves:

    N micro-batches, micro-batch k of B_k rows, each backward seeded with dloss = B_k / B:

        loss  = sum_k (B_k / B) loss_k             grads = sum_k d((B_k / B) loss_k)

so that, the loss being a mean over all B T positions, N micro-batches give the gradients of one
batch of B = sum_k B_k rows (to rounding; a test checks 1e-12 in float64), while only one
micro-batch's activations exist at a time. The optimiser steps once, after the last one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..backend import device_rng
from ..optim import clip_grad_norm
from ..validate import check_int


def forward_backward(model, x, y, dropout_key=None, dloss: float = 1.0):
    """The first half: the loss of the batch (x, y) and the gradients of dloss times it.

    x, y: (B, T) token ids; dropout_key, e.g. (seed, DROPOUT_STREAM, step), seeds this batch's dropout
    masks (None: no dropout). Returns (loss, a device scalar; {trainable name: gradient}). The logits
    and the cache die here, so the activations are freed before the update allocates anything.
    """
    dropout_rng = None if dropout_key is None else device_rng(model.xp, *dropout_key)
    loss, cache = model.forward(x, y, dropout_rng=dropout_rng)[1:]
    return loss, model.backward(cache, dloss)


def apply_update(optimizer, grads: dict, lr: float | None, grad_clip: float) -> None:
    """The second half: clip the gradients to a global norm of grad_clip (0: off), then step the optimiser."""
    if grad_clip > 0:
        clip_grad_norm(grads, grad_clip)
    optimizer.step(grads, lr)


def train_step(model, optimizer, x, y, lr: float | None, grad_clip: float, dropout_key=None):
    """One batch's work, the two halves together: forward and backward, then clip and update. Returns the loss."""
    loss, grads = forward_backward(model, x, y, dropout_key)
    apply_update(optimizer, grads, lr, grad_clip)
    return loss


def split_bounds(rows: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of each of ``parts`` slices of ``rows`` rows: as equal as possible, none empty."""
    parts = max(1, min(parts, rows))
    edges = np.linspace(0, rows, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def micro_batch_key(dropout_key, k: int, n: int):
    """Micro-batch k's dropout key: the step's own with one micro-batch, else with k appended."""
    return dropout_key if dropout_key is None or n == 1 else (*dropout_key, k)


class TrainingStep:
    """A training step made of two halves, with gradient accumulation over ``grad_accum`` micro-batches.

    Called as ``train_step`` is: ``step(model, optimizer, x, y, lr, grad_clip, dropout_key)``, with
    x, y the whole (B, T) batch of the optimiser step; it runs ``forward_backward`` on each of the
    grad_accum micro-batches (rows split as evenly as possible), sums their weighted gradients, and
    calls ``apply_update`` once. A fast step subclasses it, or hands it its halves.
    """

    def __init__(
        self,
        forward_backward: Callable = forward_backward,
        apply_update: Callable = apply_update,
        grad_accum=1,
    ):
        self.forward_backward = forward_backward
        self.apply_update = apply_update
        self.grad_accum = check_int("grad_accum", grad_accum, minimum=1)

    def __call__(self, model, optimizer, x, y, lr: float | None, grad_clip: float, dropout_key=None):
        loss, grads = self.accumulate(model, x, y, dropout_key)
        self.apply_update(optimizer, grads, lr, grad_clip)
        return loss

    def accumulate(self, model, x, y, dropout_key=None):
        """(loss, grads) of the whole batch, from its micro-batches one after the other (see the module)."""
        rows, n = x.shape[0], self.grad_accum
        if rows < n:
            raise ValueError(f"a batch of {rows} rows cannot be cut into grad_accum={n} micro-batches")
        loss, total = 0.0, None
        for k, (start, stop) in enumerate(split_bounds(rows, n)):
            weight = (stop - start) / rows  # this micro-batch's share of the mean over the whole batch
            part, grads = self.forward_backward(
                model, x[start:stop], y[start:stop], micro_batch_key(dropout_key, k, n), weight
            )
            loss = loss + weight * part if n > 1 else part
            if total is None:  # a fast half may hand out its own buffers: keep a copy when more come
                total = grads if n == 1 else {name: g.copy() for name, g in grads.items()}
            else:
                for name, g in grads.items():
                    total[name] += g
        return loss, total
