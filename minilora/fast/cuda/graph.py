"""A training step's GPU work captured once as a CUDA graph and replayed every step after.

Why. A medium-preset step is several hundred small kernels. Launched one by one from Python, each
costs CuPy some microseconds of host time, and the GPU, which finishes most of them faster than that,
waits for the host. A CUDA graph records the kernels of one step once; replaying it launches all of
them with one call, so the step runs at the speed of the GPU instead of the speed of Python.

What is captured: the model's forward and backward and the gradient clipping (the reference
``clip_grad_norm``), everything between "the batch is on the device" and "the gradients are ready".
The optimiser runs after the graph on the same stream, as ordinary launches (one, with the fused
AdamW): its learning rate and bias corrections change every step, and a graph would freeze them at
their values during the capture.

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

``GraphedStep`` and ``cuda_train_step`` are called as ``training.loop.train_step`` is, so either is a
``step=`` for ``train_loop``.
"""

from __future__ import annotations

from ...backend import device_rng
from ...optim import clip_grad_norm
from . import use_cublas
from .optim import fused_clip_grad_norm, optimizer_step


def can_capture(model) -> bool:
    """Whether a model's training step can be captured: it lives on a GPU and uses no dropout."""
    lora_config = getattr(model, "lora_config", None)  # LoraGPT's active adapter (None when it has none)
    lora_dropout = lora_config.lora_dropout if lora_config is not None else 0.0
    dropout = getattr(model.config, "dropout", 0.0)  # a Llama has none
    return model.xp.__name__ == "cupy" and dropout == 0 and lora_dropout == 0


def cuda_train_step(model, optimizer, x, y, lr: float | None, grad_clip: float, dropout_key=None):
    """``train_step`` on the GPU, launched eagerly, with the fused clipping and AdamW update."""
    dropout_rng = None if dropout_key is None else device_rng(model.xp, *dropout_key)
    loss, cache = model.forward(x, y, dropout_rng=dropout_rng)[1:]  # the logits are freed at once
    grads = model.backward(cache)
    if grad_clip > 0:
        fused_clip_grad_norm(grads, grad_clip)
    optimizer_step(optimizer, grads, lr)
    return loss


class GraphedStep:
    """A training step for one model and optimiser on a GPU: ``warmup`` eager steps, then graph replays.

    One call is the training loop's work for a batch: forward, backward, clipping and the optimiser's
    step. x, y: (B, T) host arrays of token ids of a fixed shape (range-checked on the host).
    """

    def __init__(self, model, optimizer, grad_clip: float, warmup: int = 2):
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
        self.outputs = None  # (loss, grads) written by every replay

    def __call__(self, model, optimizer, x, y, lr: float | None, grad_clip: float, dropout_key=None):
        """The ``train_step`` signature; the model, optimiser and clip must be the ones captured."""
        if model is not self.model or optimizer is not self.optimizer or grad_clip != self.grad_clip:
            raise ValueError(
                "this GraphedStep was built for another model, optimiser or grad_clip; make a new one"
            )
        return self.replay(x, y, lr)

    def replay(self, x, y, lr: float | None = None):
        """One step on the batch (x, y); returns the loss (overwritten by the next replay)."""
        caller = self.cupy.cuda.get_current_stream()
        self.stream.wait_event(caller.record())  # the step starts after the caller's earlier work
        with self.stream:  # the upload, the step and the optimiser, in this stream's order
            ids = (
                self.model.check_token_ids(x, "idx"),
                self.model.check_token_ids(y, "targets"),
            )  # host range check
            loss, grads = self._forward_backward(*ids)
            optimizer_step(self.optimizer, grads, lr)  # after the graph, in stream order; default memory pool
        caller.wait_event(
            self.stream.record()
        )  # the caller's later work (reading the loss) waits for the step
        return loss

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
        grads = self.model.backward(cache)
        if self.grad_clip > 0:
            clip_grad_norm(grads, self.grad_clip)  # the reference sums: the fused norm cannot be captured
        return loss, grads
