"""One optimiser step, split at its seam: the gradients of a batch, then the update they make.

    loss, grads = forward_backward(model, x, y, dropout_key)      the first half
    apply_update(optimizer, grads, lr, grad_clip)                 the second half

A batch is x, y (B, T) and, for rows that pack several examples, ``positions`` (B, T): each token's
position within its example (language_model.py). Targets equal to IGNORE are not scored
(layers/cross_entropy.py).

``train_step`` is the two together, in plain sight. Every faster step replaces one half and keeps the
other (``minilora.fast``): the batch split across CPU threads, across MPI ranks, or replayed as a CUDA
graph replaces the first; the fused clipping and AdamW kernels replace the second. A
``TrainingStep`` holds the two halves a run uses, and is where gradient accumulation lives, once, for
every pair of halves:

    N micro-batches, micro-batch k with n_k scored targets of the batch's n = sum_k n_k, each
    backward seeded with dloss = n_k / n:

        loss  = sum_k (n_k / n) loss_k             grads = sum_k d((n_k / n) loss_k)

so that, loss_k being the mean over micro-batch k's n_k scored targets, N micro-batches give the
loss and gradients of one batch (to rounding; a test checks 1e-12 in float64), while only one
micro-batch's activations exist at a time: the mean is over the scored targets of the whole
optimiser step, not of each micro-batch. With every target scored, n_k / n = B_k / B, the
micro-batch's share of the rows. The optimiser steps once, after the last one. Every split of a batch
(threads, MPI ranks) weighs its slices by ``share_of_scored`` the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..backend import device_rng, get_xp
from ..layers import IGNORE
from ..optim import clip_grad_norm
from ..validate import check_int


def forward_backward(model, x, y, dropout_key=None, dloss: float = 1.0, positions=None):
    """The first half: the loss of the batch (x, y) and the gradients of dloss times it.

    x, y: (B, T) token ids; dropout_key, e.g. (seed, DROPOUT_STREAM, step), seeds this batch's dropout
    masks (None: no dropout); positions: (B, T) for packed rows, or None. Returns (loss, a device
    scalar; {trainable name: gradient}). The logits and the cache die here, so the activations are
    freed before the update allocates anything.
    """
    dropout_rng = None if dropout_key is None else device_rng(model.xp, *dropout_key)
    loss, cache = model.forward(x, y, dropout_rng=dropout_rng, positions=positions)[1:]
    return loss, model.backward(cache, dloss)


def apply_update(optimizer, grads: dict, lr: float | None, grad_clip: float) -> None:
    """The second half: clip the gradients to a global norm of grad_clip (0: off), then step the optimiser."""
    if grad_clip > 0:
        clip_grad_norm(grads, grad_clip)
    optimizer.step(grads, lr)


def train_step(model, optimizer, x, y, lr: float | None, grad_clip: float, dropout_key=None, positions=None):
    """One batch's work, the two halves together: forward and backward, then clip and update. Returns the loss."""
    loss, grads = forward_backward(model, x, y, dropout_key, positions=positions)
    apply_update(optimizer, grads, lr, grad_clip)
    return loss


def split_bounds(rows: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of each of ``parts`` slices of ``rows`` rows: as equal as possible, none empty."""
    parts = max(1, min(parts, rows))
    edges = np.linspace(0, rows, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def share_of_scored(y, start: int, stop: int) -> float:
    """Rows start:stop's share of the mean over the batch's scored targets: n_k / n (see the module).

    y: (B, T) targets, IGNORE where not scored. A batch with nothing scored (its loss is 0) is
    shared by rows. Counting reads y: a host array, as the training loop's batches are.
    """
    xp = get_xp(y)
    n_slice, n_all = int(xp.count_nonzero(y[start:stop] != IGNORE)), int(xp.count_nonzero(y != IGNORE))
    return n_slice / n_all if n_all else (stop - start) / y.shape[0]


def rows_of(positions, start: int, stop: int):
    """Rows start:stop of a batch's positions, or None for rows of one sequence each."""
    return None if positions is None else positions[start:stop]


def micro_batch_key(dropout_key, k: int, n: int):
    """Micro-batch k's dropout key: the step's own with one micro-batch, else with k appended."""
    return dropout_key if dropout_key is None or n == 1 else (*dropout_key, k)


class TrainingStep:
    """A training step made of two halves, with gradient accumulation over ``grad_accum`` micro-batches.

    Called as ``train_step`` is: ``step(model, optimizer, x, y, lr, grad_clip, dropout_key, positions)``,
    with x, y the whole (B, T) batch of the optimiser step; it runs ``forward_backward`` on each of
    the grad_accum micro-batches (rows split as evenly as possible), sums their weighted gradients,
    and calls ``apply_update`` once. A fast step subclasses it, or hands it its halves.
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

    def __call__(
        self, model, optimizer, x, y, lr: float | None, grad_clip: float, dropout_key=None, positions=None
    ):
        loss, grads = self.accumulate(model, x, y, dropout_key, positions)
        self.apply_update(optimizer, grads, lr, grad_clip)
        return loss

    def accumulate(self, model, x, y, dropout_key=None, positions=None):
        """(loss, grads) of the whole batch, from its micro-batches one after the other (see the module)."""
        rows, n = x.shape[0], self.grad_accum
        if rows < n:
            raise ValueError(f"a batch of {rows} rows cannot be cut into grad_accum={n} micro-batches")
        loss, total = 0.0, None
        for k, (start, stop) in enumerate(split_bounds(rows, n)):
            weight = share_of_scored(y, start, stop)  # this micro-batch's share of the whole batch's mean
            key = micro_batch_key(dropout_key, k, n)
            part, grads = self.forward_backward(
                model, x[start:stop], y[start:stop], key, weight, rows_of(positions, start, stop)
            )
            loss = loss + weight * part if n > 1 else part
            if total is None:  # a fast half may hand out its own buffers: keep a copy when more come
                total = grads if n == 1 else {name: g.copy() for name, g in grads.items()}
            else:
                for name, g in grads.items():
                    total[name] += g
        return loss, total
