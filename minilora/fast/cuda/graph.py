"""A training step's GPU work captured once as a CUDA graph and replayed every step after.

Why. A medium-preset step is several hundred small kernels. Launched one by one from Python, each
costs CuPy some microseconds of host time, and the GPU, which finishes most of them faster than that,
waits for the host. A CUDA graph records the kernels of one step once; replaying it launches all of
them with one call, so the step runs at the speed of the GPU instead of the speed of Python.

What is captured: the first half of the step (training/step.py), the model's forward and backward,
everything between "the batch is on the device" and "the gradients are ready". The second half
runs after the graph on the same stream, as ordinary launches: the fused clipping (a few launches;
its table of pointers is uploaded from the host, which a capture forbids) and the fused AdamW (one
launch: its learning rate and bias corrections change every step, and a graph would freeze them at
their values during the capture). With gradient accumulation the graph replays once per micro-batch.

What makes replaying safe:

- Static inputs. The graph reads the batch from two device buffers that never move; each step
  copies its batch into them first.
- A private memory pool. Every array the step allocates during the warm-up and the capture comes
  from a pool that only this graph uses, so the addresses baked into the graph are never handed to
  another array between replays. The warm-up steps run the same code first, so during the capture
  every allocation is served from blocks the pool already holds (a fresh cudaMalloc is not allowed
  while a stream is capturing).
- No host synchronisation inside the step and no randomness: dropout would freeze one mask into
  the graph, so a model with dropout is refused.
- The same parameter arrays. The optimiser updates them in place; a model whose parameter arrays
  are replaced (a new adapter, a reload) needs a new ``GraphedStep``.

The loss is an array the graph overwrites on every replay: read it before the next call.

``GraphedStep`` and ``cuda_train_step`` are ``TrainingStep``s, called as ``training.step.train_step``
is, so either is a ``step=`` for ``train_loop``.
"""

from __future__ import annotations

from ...training.step import TrainingStep
from . import use_cublas
from .optim import fused_apply_update


def can_capture(model) -> bool:
    """Whether a model's training step can be captured: it lives on a GPU and draws no dropout masks."""
    return model.xp.__name__ == "cupy" and not model.uses_dropout()


def cuda_train_step(grad_accum: int = 1) -> TrainingStep:
    """``train_step`` on the GPU, launched eagerly: the reference first half, the fused clipping and AdamW."""
    return TrainingStep(apply_update=fused_apply_update, grad_accum=grad_accum)


class GraphedStep(TrainingStep):
    """A training step for one model and optimiser on a GPU: ``warmup`` eager steps, then graph replays.

    One call is the training loop's work for a batch: forward and backward (the captured first half,
    once per micro-batch), then the fused clipping and update. x, y: (B, T) host arrays of token ids
    of a fixed shape (range-checked on the host).
    """

    def __init__(self, model, optimizer, grad_clip: float, warmup: int = 2, grad_accum: int = 1):
        import cupy

        if model.xp is not cupy:
            raise ValueError("GraphedStep needs a model on the GPU (device='cuda')")
        if not can_capture(model):
            raise ValueError(
                "GraphedStep cannot capture dropout (a graph would replay one mask forever); "
                "train with dropout 0 or without the graph"
            )
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the capture reuses the warm-up's memory), got {warmup}")
        super().__init__(self.forward_backward, fused_apply_update, grad_accum)
        use_cublas()  # CuPy's own matmul refuses to run while a stream captures; our cuBLAS handle does not
        self.cupy = cupy
        self.model = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.warmup = warmup
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pool = cupy.cuda.MemoryPool()
        self.graph = None
        self.calls = 0
        self.x = self.y = None  # the static input buffers, made on the first call
        self.dloss = None  # the backward's seed, fixed by the capture (1 / grad_accum for even micro-batches)
        self.outputs = None  # (loss, grads) written by every replay

    def __call__(self, model, optimizer, x, y, lr: float | None, grad_clip: float, dropout_key=None):
        """The ``train_step`` signature; the model, optimiser and clip must be the ones captured."""
        if model is not self.model or optimizer is not self.optimizer or grad_clip != self.grad_clip:
            raise ValueError(
                "this GraphedStep was built for another model, optimiser or grad_clip; make a new one"
            )
        caller = self.cupy.cuda.get_current_stream()
        self.stream.wait_event(caller.record())  # the step starts after the caller's earlier work
        with self.stream:  # the uploads, the replays and the update, in this stream's order
            loss = super().__call__(model, optimizer, x, y, lr, grad_clip)
        caller.wait_event(self.stream.record())  # the caller's later work (reading the loss) waits for it
        return loss

    def forward_backward(self, model, x, y, dropout_key=None, dloss: float = 1.0):
        """The captured first half on (x, y): (loss, grads), both overwritten by the next replay."""
        ids = (model.check_token_ids(x, "idx"), model.check_token_ids(y, "targets"))  # host range check
        if self.dloss is None:
            self.dloss = dloss
        if dloss != self.dloss:
            raise ValueError(f"GraphedStep captured a backward seeded with {self.dloss}, got {dloss}")
        return self._forward_backward(*ids)

    def _forward_backward(self, x, y):
        cupy = self.cupy
        with cupy.cuda.using_allocator(self.pool.malloc):
            if self.x is None:
                self.x, self.y = cupy.empty_like(x), cupy.empty_like(y)
            if x.shape != self.x.shape or y.shape != self.y.shape:
                raise ValueError(f"GraphedStep was built for batches of shape {self.x.shape}, got {x.shape}")
            self.x[...], self.y[...] = x, y
            self.calls += 1
            if self.calls <= self.warmup:
                return self._step()
            if self.graph is None:
                self.stream.begin_capture()
                try:
                    outputs = self._step()
                except BaseException:
                    self.stream.end_capture()  # leaves the stream usable; the half-made graph is dropped
                    raise
                self.graph, self.outputs = self.stream.end_capture(), outputs
            self.graph.launch(self.stream)
            return self.outputs

    def _step(self):
        _, loss, cache = self.model.forward(self.x, self.y)
        return loss, self.model.backward(cache, dloss=self.dloss)
