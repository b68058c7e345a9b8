"""The data-parallel step on GPUs: the CUDA-graph step with an NCCL all-reduce of the flat gradients.

Each GPU is one MPI rank (or the only process). Rank 0 makes an NCCL unique id, sends it to the others
over MPI (``comm.bcast``; with one rank nothing is sent), and every rank joins the communicator with it.
The step is ``cuda.graph.GraphedStep``'s with three changes to its first half: the rank takes its
rows of the global batch, its backward is seeded with its share n_i / n of the batch's scored
targets (training/step.py: B_i / B when every target is scored), and after the backward the trainable
gradients (and the loss) are packed into one flat buffer and summed in place across the GPUs by
``ncclAllReduce`` on the step's stream. NCCL allows its calls inside CUDA-graph capture (NCCL 2.9 and
later), so the all-reduce is part of the captured graph and replays with it; the warm-up steps run
it eagerly first. The optimiser runs after the graph, as in ``GraphedStep``.

Unlike the MPI step's rank-ordered sum, NCCL's ring or tree decides the order of the additions; for
a fixed GPU count and topology NCCL gives the same bits run after run, but a run on 4 GPUs and one on
8 may differ in the last bits. With one rank the all-reduce copies the buffer: the step equals the
plain ``GraphedStep`` (tests/test_distributed_nccl.py).
"""

from __future__ import annotations

from ...training.step import rows_of, share_of_scored, split_bounds
from ..cuda.graph import GraphedStep
from .world import World


def nccl_communicator(world: World):
    """A ``cupy.cuda.nccl.NcclCommunicator`` over the ranks of ``world``, its id broadcast over MPI."""
    from cupy.cuda import nccl

    unique_id = nccl.get_unique_id() if world.rank == 0 else None
    if world.comm is not None:
        unique_id = world.comm.bcast(unique_id, root=0)
    return nccl.NcclCommunicator(world.size, unique_id, world.rank)


class NcclGraphedStep(GraphedStep):
    """``GraphedStep`` whose captured first half ends with an all-reduce of the gradients over ``world``'s GPUs.

    x, y: the global (B, T) batch on the host; this rank uses rows ``split_bounds(B, size)[rank]``
    of each micro-batch.
    """

    def __init__(
        self, model, optimizer, grad_clip: float, world: World, warmup: int = 2, grad_accum: int = 1
    ):
        super().__init__(model, optimizer, grad_clip, warmup, grad_accum)
        self.world = world
        self.nccl_comm = nccl_communicator(world)
        self.names = list(optimizer.names)
        self.weight = None  # this rank's share n_i / n of the micro-batch's scored targets, set by each call

    def forward_backward(self, model, x, y, dropout_key=None, dloss: float = 1.0, positions=None):
        B = x.shape[0]
        if B < self.world.size:
            raise ValueError(
                f"a batch of {B} rows is smaller than the {self.world.size} ranks: each needs a row"
            )
        start, stop = split_bounds(B, self.world.size)[self.world.rank]
        self.weight = share_of_scored(y, start, stop)  # read by _step, through the seed's buffer
        rows = rows_of(positions, start, stop)
        return super().forward_backward(model, x[start:stop], y[start:stop], dropout_key, dloss, rows)

    def copy_inputs(self, inputs: dict, dloss) -> None:
        """The rank's rows and its seeds: dloss times the rank's share, and the share alone for the loss."""
        super().copy_inputs(inputs, dloss * self.weight)
        if "share" not in self.seeds:
            self.seeds["share"] = self.cupy.empty((), dtype=self.seeds["dloss"].dtype)
        self.seeds["share"].fill(self.weight)

    def _step(self):
        from cupy.cuda import nccl

        cupy = self.cupy
        inputs = self.inputs
        _, loss, cache = self.model.forward(inputs["x"], inputs["y"], positions=inputs.get("positions"))
        grads = self.model.backward(cache, dloss=self.seeds["dloss"])
        # One buffer filled slice by slice: cupy.concatenate of many arrays copies their pointers from
        # the host, which a stream being captured refuses; a slice assignment is one device kernel each.
        total = sum(grads[name].size for name in self.names)
        flat = cupy.empty(total + 1, dtype=loss.dtype)
        offset = 0
        for name in self.names:
            size = grads[name].size
            flat[offset : offset + size] = grads[name].reshape(-1)
            offset += size
        flat[total:] = (loss * self.seeds["share"]).reshape(1)
        dtype = nccl.NCCL_FLOAT64 if flat.dtype == cupy.float64 else nccl.NCCL_FLOAT32
        self.nccl_comm.allReduce(
            flat.data.ptr, flat.data.ptr, flat.size, dtype, nccl.NCCL_SUM, self.stream.ptr
        )
        summed, offset = {}, 0
        for name in self.names:  # views into the summed buffer, shaped as the gradients
            size = grads[name].size
            summed[name] = flat[offset : offset + size].reshape(grads[name].shape)
            offset += size
        return flat[-1].reshape(()), summed
