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

- Static inputs. The graph reads the batch (x, y, and the positions of packed rows) and the
  backward's seed from device buffers that never move; each call copies its own into them first.
  The seed changes from micro-batch to micro-batch when targets are masked (its share of the step's
  scored targets, training/step.py), so it is a buffer too, not a number frozen by the capture.
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


def seed_dtype(model):
    """The dtype of the backward's seed: the trainable parameters' float64, else float32 (bf16's losses are float32)."""
    import cupy

    trainable = model.params[model.trainable_names[0]]
    return cupy.float64 if trainable.dtype == cupy.float64 else cupy.float32


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
        self.inputs = None  # {"x", "y"[, "positions"]}: the static batch buffers, made on the first call
        self.seeds = None  # {"dloss"}: the backward's seed, a 0-d buffer
        self.outputs = None  # (loss, grads) written by every replay

    def __call__(
        self, model, optimizer, x, y, lr: float | None, grad_clip: float, dropout_key=None, positions=None
    ):
        """The ``train_step`` signature; the model, optimiser and clip must be the ones captured."""
        if model is not self.model or optimizer is not self.optimizer or grad_clip != self.grad_clip:
            raise ValueError(
                "this GraphedStep was built for another model, optimiser or grad_clip; make a new one"
            )
        caller = self.cupy.cuda.get_current_stream()
        self.stream.wait_event(caller.record())  # the step starts after the caller's earlier work
        with self.stream:  # the uploads, the replays and the update, in this stream's order
            loss = super().__call__(model, optimizer, x, y, lr, grad_clip, positions=positions)
        caller.wait_event(self.stream.record())  # the caller's later work (reading the loss) waits for it
        return loss

    def forward_backward(self, model, x, y, dropout_key=None, dloss: float = 1.0, positions=None):
        """The captured first half on (x, y): (loss, grads), both overwritten by the next replay."""
        inputs = {"x": model.check_token_ids(x, "idx"), "y": model.check_targets(y, x)}  # host range checks
        if positions is not None:
            inputs["positions"] = model.check_positions(positions, x)
        return self._forward_backward(inputs, dloss)

    def _forward_backward(self, inputs: dict, dloss):
        cupy = self.cupy
        with cupy.cuda.using_allocator(self.pool.malloc):
            if self.inputs is None:
                self.inputs = {name: cupy.empty_like(value) for name, value in inputs.items()}
                self.seeds = {"dloss": cupy.empty((), dtype=seed_dtype(self.model))}
            self.copy_inputs(inputs, dloss)
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

    def copy_inputs(self, inputs: dict, dloss) -> None:
        """This call's batch and seed into the static buffers, after checking that they fit them."""
        static = self.inputs
        if set(inputs) != set(static):
            raise ValueError(
                "GraphedStep was captured with packed rows (positions) and is now called without, or the "
                "other way round: make a new one"
            )
        for name, value in inputs.items():
            if value.shape != static[name].shape:
                raise ValueError(
                    f"GraphedStep was built for batches of shape {static['x'].shape}, got {value.shape}"
                )
            static[name][...] = value
        self.seeds["dloss"].fill(dloss)

    def _step(self):
        inputs = self.inputs
        _, loss, cache = self.model.forward(inputs["x"], inputs["y"], positions=inputs.get("positions"))
        return loss, self.model.backward(cache, dloss=self.seeds["dloss"])
