"""A data-parallel training step over MPI ranks: each rank a shard of the batch, the gradients summed.

This is ``fast.cpu.sharded_step`` with processes instead of threads, so it can span machines. Every
rank draws the same global batch of B sequences (the batch is a function of seed and step), keeps
its rows ``split_bounds(B, size)[rank]``, and runs forward and backward on them with the backward
seeded with dloss = n_i / n, its share of the mean over the whole batch's scored targets
(``training.step.share_of_scored``: B_i / B when every target is scored). The trainable gradients
(and the shard's loss) are then packed into one flat buffer, exchanged, and summed; every rank ends
with the whole batch's gradients, clips them and takes the same optimiser step, so the parameters
stay identical on every rank without ever being sent.

Only trainable gradients travel. With LoRA that is the adapter: for r = 8 on c_attn, well under 1% of
what a full fine-tune sends (``traffic.py`` counts it).

The exchange is an ``Allgather`` of the flat buffers followed by a sum in rank order 0, 1, ..., N-1 on
every rank, not an ``Allreduce``. MPI leaves the order of an Allreduce's additions to the library
(it may change with the rank count, the message size or the algorithm chosen), and floating-point
addition is not associative, so two runs could differ in the last bits and ranks could even disagree.
The rank-ordered sum is the same on every rank and in every run. Its price is N buffers of memory
and traffic per rank instead of about two: negligible for an adapter, the first thing to revisit for a
full fine-tune on many ranks.

Each rank runs its BLAS on one thread, so N ranks on N cores do not fight over them (start one rank
per core). With one rank the sum is the rank's own gradient, so a one-rank run is the reference step (float
rounding aside: B_i / B = 1). Dropout masks come from (seed, stream, step, rank) when there are
several ranks, so results with dropout depend on the rank count, as they do on the shard count.
"""

from __future__ import annotations

import time

import numpy as np

from ...backend import device_rng
from ...training.step import TrainingStep, apply_update, rows_of, share_of_scored, split_bounds
from ..cpu.sharded_step import _blas_controller
from .world import World


def shard_forward_backward(
    model, x, y, dropout_key, start: int, stop: int, shard_id: int | None, dloss=1.0, positions=None
):
    """This shard's weighted loss and gradients: rows start:stop of (B, T) x, y, weighted n_i / n."""
    rng = (
        None
        if dropout_key is None
        else device_rng(model.xp, *dropout_key, *(() if shard_id is None else (shard_id,)))
    )
    loss, cache = model.forward(
        x[start:stop], y[start:stop], dropout_rng=rng, positions=rows_of(positions, start, stop)
    )[1:]  # the logits are freed now
    weight = share_of_scored(y, start, stop)  # this shard's share of the mean over the whole batch
    return loss * weight, model.backward(cache, dloss=dloss * weight)


def pack(grads: dict, names, loss, out: np.ndarray) -> np.ndarray:
    """Every gradient of ``names``, in that order, then the loss, into the flat buffer ``out`` (n + 1,)."""
    offset = 0
    for name in names:
        size = grads[name].size
        out[offset : offset + size] = grads[name].reshape(-1)
        offset += size
    out[offset] = loss
    return out


def unpack(flat: np.ndarray, grads: dict, names) -> dict:
    """Views into ``flat`` shaped as ``grads``' arrays: the summed gradients, without a copy."""
    views, offset = {}, 0
    for name in names:
        shape, size = grads[name].shape, grads[name].size
        views[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return views


class MpiStep(TrainingStep):
    """A ``TrainingStep`` over the ranks of ``world``: called as ``training.step.train_step`` is.

    Its first half is this rank's shard, then the exchange; the update is the reference's. With
    gradient accumulation each micro-batch is exchanged on its own (N exchanges a step).
    Counters for the bench and the docs: ``bytes_sent`` per exchange (this rank's buffer, sent to
    each of the other ranks), ``comm_seconds`` (time inside the exchange and the sum, summed).
    """

    def __init__(self, world: World, trainable_names, grad_accum: int = 1):
        super().__init__(self.forward_backward, apply_update, grad_accum)
        self.world = world
        self.names = list(trainable_names)
        self.buffers = None  # (own flat buffer (n + 1,), gathered (size, n + 1)), made on the first call
        self.comm_seconds = 0.0
        self.exchanges = 0

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sends in one exchange (its buffer to each of the size - 1 others)."""
        return 0 if self.buffers is None else self.buffers[0].nbytes * (self.world.size - 1)

    def forward_backward(self, model, x, y, dropout_key=None, dloss: float = 1.0, positions=None):
        """The whole batch's loss and gradients, every rank computing its rows and all of them summed."""
        world = self.world
        start, stop = split_bounds(x.shape[0], world.size)[world.rank] if x.shape[0] >= world.size else (0, 0)
        if stop == start:
            raise ValueError(
                f"a batch of {x.shape[0]} rows is smaller than the {world.size} ranks: each needs a row"
            )
        shard_id = world.rank if world.size > 1 else None
        with _blas_controller().limit(limits=1, user_api="blas"):  # one core per rank, as one per shard
            loss, grads = shard_forward_backward(
                model, x, y, dropout_key, start, stop, shard_id, dloss, positions
            )
        if self.buffers is None:
            n = sum(grads[name].size for name in self.names)
            dtype = grads[self.names[0]].dtype
            self.buffers = (np.empty(n + 1, dtype=dtype), np.empty((world.size, n + 1), dtype=dtype))
        own, gathered = self.buffers
        pack(grads, self.names, loss, own)
        started = time.perf_counter()
        total = self.exchange(own, gathered)  # (n + 1,): the whole batch's gradients and loss
        self.comm_seconds += time.perf_counter() - started
        self.exchanges += 1
        return total[-1:].reshape(()), unpack(total, grads, self.names)  # the loss, a 0-d array

    def exchange(self, own: np.ndarray, gathered: np.ndarray) -> np.ndarray:
        """Every rank's buffer gathered, then summed in rank order: the same bits on every rank."""
        if self.world.comm is None:
            return own.copy()
        self.world.comm.Allgather(own, gathered)  # gathered[r] = rank r's buffer
        total = gathered[0].copy()
        for rank in range(1, self.world.size):  # a fixed order: 0 + 1 + 2 + ...
            total += gathered[rank]
        return total
