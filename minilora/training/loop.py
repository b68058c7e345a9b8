"""The training loop: batches, forward, backward, clipping, an optimiser step, evaluation, checkpoints.

Every step's randomness is a pure function of (seed, step): the batch comes from a host generator
seeded with (seed, DATA_STREAM, step) and the dropout masks from a device generator seeded with
(seed, DROPOUT_STREAM, step) (and the shard, when a CPU step is split across cores: see
data_parallel). Resuming at step k therefore needs only the parameters, the optimiser state and k,
and k steps + save + resume + (N - k) steps reproduce N steps exactly.

On a GPU, a model without dropout trains through ``cuda_graph.GraphedStep``: the same step, captured
once as a CUDA graph and replayed. A loss value is read (forcing a GPU sync) only every
``log_interval`` steps and at evaluations. A
non-finite loss, or non-finite parameters found before a save, stop training with TrainingDiverged;
the last checkpoint on disk, written before things went wrong, is left as it was.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

import numpy as np

from ..backend import host_rng, synchronize
from ..io.checkpoint import all_finite
from ..fast.cuda.graph import GraphedStep, can_capture
from ..io.data import get_batch
from ..fast.cpu.sharded_step import forward_backward
from .evaluate import bits_per_byte
from ..fast.cpu.host_memory import retain_freed_memory
from ..optim import clip_grad_norm, cosine_lr

DATA_STREAM, DROPOUT_STREAM = 0, 1  # independent random streams derived from one seed


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN or infinite."""


@dataclass
class TrainSettings:
    steps: int = 2000  # total optimiser steps
    batch_size: int = 16  # B sequences per step, each of the model's block_size tokens
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only
    grad_clip: float = 1.0  # global gradient-norm limit; 0 turns clipping off
    seed: int = 0  # initial weights, batch order and dropout masks all derive from it
    eval_interval: int = 250  # steps between validation evaluations and checkpoints
    eval_windows: int = 64  # validation windows per periodic evaluation (spread over the split)
    log_interval: int = 10  # steps between loss reads (each read syncs a GPU)

    def __post_init__(self):
        positive = ("steps", "batch_size", "eval_interval", "eval_windows", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("lr must be > 0 and min_lr, warmup_steps, grad_clip >= 0")


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)  # {"step", "loss", "lr"} every log_interval steps
    evals: list = field(default_factory=list)  # {"step", "val_bits_per_byte"}
    tokens_per_second: float = 0.0  # training throughput over this run (evaluations excluded)
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def train_step(model, optimizer, x, y, grad_clip: float, lr: float | None = None, dropout_key=None, shards=None):
    """One batch's work: forward, backward, clipping (grad_clip 0: off), the optimiser's step. Returns the loss.

    x, y: (B, T) token ids; dropout_key seeds the dropout masks (None: no dropout); shards: see
    data_parallel.forward_backward. The loss stays a device scalar. Locals die at return, so the
    step's activations are freed before the next step allocates its own.
    """
    loss, grads = forward_backward(model, x, y, dropout_key, shards)
    if grad_clip > 0:
        clip_grad_norm(grads, grad_clip)
    optimizer.step(grads, lr)
    return loss


def train_loop(model, optimizer, corpus, settings: TrainSettings, save=None, start_step: int = 0,
               progress: bool = True, report: bool = True) -> TrainResult:
    """Train ``model`` in place from ``start_step`` to ``settings.steps``; see the module docstring.

    ``save(step, val_bits_per_byte)``, if given, writes a checkpoint after each evaluation; the
    trainable parameters are checked to be finite first, so a diverged model is never saved.
    ``progress`` shows a progress bar; ``report`` prints a line per evaluation.
    """
    B, T = settings.batch_size, model.config.block_size
    xp = model.xp
    if xp is np:
        retain_freed_memory()  # reuse last step's freed activations instead of fresh, zero-filled pages
    graphed = GraphedStep(model, optimizer, settings.grad_clip) if can_capture(model) else None  # GPU, no dropout
    result = TrainResult()
    started, eval_seconds = time.perf_counter(), 0.0  # evaluation time is excluded from tokens/s
    bar = tqdm(range(start_step, settings.steps), initial=start_step, total=settings.steps, desc="train",
               unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        lr = cosine_lr(step, settings.lr, settings.steps, settings.warmup_steps, settings.min_lr)
        x, y = get_batch(corpus.train, B, T, host_rng(settings.seed, DATA_STREAM, step))  # (B, T) each
        if graphed is not None:
            loss = graphed(x, y, lr)  # the same work, replayed as one CUDA graph
        else:
            loss = train_step(model, optimizer, x, y, settings.grad_clip, lr, (settings.seed, DROPOUT_STREAM, step))
        done = step + 1
        if done % settings.log_interval == 0 or done == settings.steps or step == start_step:
            loss_value = float(loss)  # syncs the device
            if not math.isfinite(loss_value):
                raise TrainingDiverged(_diverged_message(f"the loss became {loss_value}", step, save))
            result.losses.append({"step": done, "loss": loss_value, "lr": lr})
            tokens_per_second = (done - start_step) * B * T / (time.perf_counter() - started - eval_seconds)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
        if done % settings.eval_interval == 0 or done == settings.steps:
            synchronize(xp)
            eval_started = time.perf_counter()
            val = bits_per_byte(model, corpus.val, batch_size=B, max_windows=settings.eval_windows)
            result.evals.append({"step": done, "val_bits_per_byte": val})
            if report:
                bar.write(f"step {done}: val {val:.4f} bits/byte")
            if save is not None:
                if not all_finite({name: model.params[name] for name in model.trainable_names}):
                    raise TrainingDiverged(_diverged_message("a parameter became NaN or infinite", step, save))
                save(done, val)
            eval_seconds += time.perf_counter() - eval_started
    bar.close()
    synchronize(xp)
    result.wall_seconds = time.perf_counter() - started
    train_seconds = result.wall_seconds - eval_seconds
    result.tokens_per_second = (settings.steps - start_step) * B * T / train_seconds if train_seconds > 0 else 0.0
    return result


def _diverged_message(what: str, step: int, save) -> str:
    kept = "the last good checkpoint is intact" if save is not None else "no checkpoint was written"
    return (f"training stopped at step {step}: {what}; {kept}. Try a lower learning rate (--lr) "
            "or gradient clipping (--grad-clip).")
