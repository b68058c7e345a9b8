"""The training loop: batches, one optimiser step each, evaluation, checkpoints.

One step is ``step.train_step``: forward and backward, then clipping and the optimiser's update, in
plain code. ``train_loop`` runs a ``TrainingStep`` (step.py: those two halves, with gradient
accumulation over ``settings.grad_accum`` micro-batches) once per batch. It also takes any other
callable with ``train_step``'s signature as ``step=``: that is the seam through which a faster step
plugs in from above (``minilora.fast``: the batch split across CPU cores, or the step replayed as a
CUDA graph). The loop itself knows nothing about those.

Every step's randomness is a pure function of (seed, step): the batch comes from a host generator
seeded with (seed, DATA_STREAM, step) and the dropout masks from a device generator seeded with
(seed, DROPOUT_STREAM, step). Resuming at step k therefore needs only the parameters, the optimiser
state and k, and k steps + save + resume + (N - k) steps reproduce N steps exactly.

A loss value is read (forcing a GPU sync) only every ``log_interval`` steps and at evaluations. A
non-finite loss, and before a save a non-finite validation value or parameter, or a validation
value above DIVERGENCE_FACTOR times the best one saved so far (finite, but the run has blown up),
stop training with TrainingDiverged: a checkpoint is written only when everything in it is finite
and the run has not diverged, so the ones on disk, written before things went wrong, are left as
they were. The jobs keep two of them, the current and the previous one; the message names the
better of those (its path and step), or says that there is none.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..backend import all_finite, host_rng, synchronize
from ..optim import cosine_lr
from ..validate import check_float, check_int
from .evaluate import loss_in_bits_per_byte
from .step import TrainingStep

DATA_STREAM, DROPOUT_STREAM = 0, 1  # independent random streams derived from one seed
DIVERGENCE_FACTOR = 4.0  # a validation value above this multiple of the best saved one: diverged, not saved


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN or infinite."""


@dataclass
class TrainSettings:
    steps: int = 2000  # total optimiser steps
    batch_size: int = 16  # B sequences per micro-batch, each of the model's block_size tokens
    grad_accum: int = 1  # micro-batches per optimiser step: each step trains on grad_accum x batch_size rows
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float | None = None  # learning rate at the end of the cosine decay; None: lr / 10
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only
    grad_clip: float = 1.0  # global gradient-norm limit; 0 turns clipping off
    seed: int = 0  # initial weights, batch order and dropout masks all derive from it
    eval_interval: int = 250  # steps between validation evaluations and checkpoints
    eval_windows: int = 64  # validation windows per periodic evaluation (spread over the split)
    log_interval: int = 10  # steps between loss reads (each read syncs a GPU)

    def __post_init__(self):
        # Each check names its field; NaN and the infinities are refused (a NaN grad_clip turns clipping off).
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_windows", "log_interval"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("warmup_steps", "seed"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=0))
        self.lr = check_float("lr", self.lr, 0.0, low_open=True)
        self.min_lr = self.lr / 10 if self.min_lr is None else check_float("min_lr", self.min_lr, 0.0)
        self.weight_decay = check_float("weight_decay", self.weight_decay, 0.0)
        self.grad_clip = check_float("grad_clip", self.grad_clip, 0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr:g}) must not be above lr ({self.lr:g}): lower min_lr too")


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)  # {"step", "loss", "lr"} every log_interval steps
    evals: list = field(default_factory=list)  # {"step", "val_bits_per_byte"}
    tokens_per_second: float = 0.0  # training throughput over this run (evaluations excluded)
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def train_loop(
    model,
    optimizer,
    corpus,
    settings: TrainSettings,
    save=None,
    start_step: int = 0,
    progress: bool = True,
    report: bool = True,
    step=None,
    saved: tuple[int, float] | None = None,
    checkpoint_paths: tuple | None = None,
) -> TrainResult:
    """Train ``model`` in place from ``start_step`` to ``settings.steps``; see the module docstring.

    ``save(step, val_bits_per_byte)``, if given, writes a checkpoint after each evaluation; the
    loss, the validation value and the trainable parameters are checked to be finite first, and the
    validation value to be at most DIVERGENCE_FACTOR times the best saved one, so a diverged model
    is never saved. ``saved``: (step, val_bits_per_byte) of the checkpoint already on disk (the one
    a resumed run started from), None if there is none; ``checkpoint_paths``: (current, previous),
    the files the latest save and the one before it are in, for the divergence message.
    ``progress`` shows a progress bar; ``report`` prints a line per evaluation. ``step`` does one
    optimiser step's work on a batch of grad_accum x batch_size rows, called as ``train_step`` is
    (default: the reference halves, ``TrainingStep``, with grad_accum).
    """
    if start_step >= settings.steps:
        raise ValueError(f"nothing to train: the run is at step {start_step} and steps is {settings.steps}")
    B, T = settings.batch_size * settings.grad_accum, model.config.block_size  # rows of one optimiser step
    step = TrainingStep(grad_accum=settings.grad_accum) if step is None else step
    xp = model.xp
    result = TrainResult()
    kept = SavedCheckpoints(checkpoint_paths, [] if saved is None else [saved])
    started, eval_seconds = time.perf_counter(), 0.0  # evaluation time is excluded from tokens/s
    bar = tqdm(
        range(start_step, settings.steps),
        initial=start_step,
        total=settings.steps,
        desc="train",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    for step_index in bar:
        lr = cosine_lr(step_index, settings.lr, settings.steps, settings.warmup_steps, settings.min_lr)
        batch = corpus.train_batch(B, T, host_rng(settings.seed, DATA_STREAM, step_index))  # (B, T) each
        dropout_key = (settings.seed, DROPOUT_STREAM, step_index)
        loss = step(model, optimizer, batch.x, batch.y, lr, settings.grad_clip, dropout_key, batch.positions)
        done = step_index + 1
        if done % settings.log_interval == 0 or done == settings.steps or step_index == start_step:
            loss_value = float(loss)  # syncs the device
            if not math.isfinite(loss_value):
                raise TrainingDiverged(kept.diverged_message(f"the loss became {loss_value}", step_index))
            batch_bits = loss_in_bits_per_byte(
                loss_value, batch.y, corpus.token_bytes
            )  # as validation reports it
            result.losses.append({"step": done, "loss": loss_value, "bits_per_byte": batch_bits, "lr": lr})
            tokens_per_second = (done - start_step) * B * T / (time.perf_counter() - started - eval_seconds)
            bar.set_postfix(
                {"bits/byte": f"{batch_bits:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_second:,.0f}"}
            )
        if done % settings.eval_interval == 0 or done == settings.steps:
            synchronize(xp)
            eval_started = time.perf_counter()
            if report:
                say(bar, f"step {done}: {corpus.evaluation_line(T, settings.eval_windows)}")
            val = corpus.val_bits_per_byte(model, settings.batch_size, settings.eval_windows, progress)
            result.evals.append({"step": done, "val_bits_per_byte": val})
            if report:
                say(bar, f"step {done}: val {val:.4f} bits/byte")
            if save is not None:
                problem = _unsaveable(model, float(loss), val) or kept.blown_up(val)
                if problem is not None:
                    raise TrainingDiverged(kept.diverged_message(problem, step_index))
                save(done, val)
                kept.saved(done, val)
            eval_seconds += time.perf_counter() - eval_started
    bar.close()
    synchronize(xp)
    result.wall_seconds = time.perf_counter() - started
    train_seconds = result.wall_seconds - eval_seconds
    result.tokens_per_second = (
        (settings.steps - start_step) * B * T / train_seconds if train_seconds > 0 else 0.0
    )
    return result


def say(bar, line: str) -> None:
    """Print ``line`` above the progress bar and flush it, so that a log file shows it at once."""
    bar.write(line)
    sys.stdout.flush()


def _unsaveable(model, loss_value: float, val: float) -> str | None:
    """Why this step's state must not be saved (a NaN or infinity somewhere), or None."""
    if not math.isfinite(loss_value):
        return f"the loss became {loss_value}"
    if not math.isfinite(val):
        return f"the validation bits per byte became {val}"
    if not all_finite({name: model.params[name] for name in model.trainable_names}):
        return "a parameter became NaN or infinite"
    return None


class SavedCheckpoints:
    """The checkpoints a run has on disk, for the divergence check and its message.

    ``entries``: (step, val_bits_per_byte) of the current one and the previous one, newest first;
    ``paths``: (current, previous), the files they are in, or None where the caller names none
    (then only the latest save is known to be on disk).
    """

    def __init__(self, paths: tuple | None, entries: list):
        self.paths, self.entries = paths, list(entries)
        self.best = min((val for _, val in self.entries), default=math.inf)  # over every save, kept or not

    def saved(self, step: int, val: float) -> None:
        self.entries = [(step, val), *self.entries][:2]  # the save before the previous one is replaced
        self.best = min(self.best, val)

    def blown_up(self, val: float) -> str | None:
        """Why ``val`` says the run has diverged (above DIVERGENCE_FACTOR x the best saved), or None."""
        if val > DIVERGENCE_FACTOR * self.best:
            return (
                f"the validation bits per byte became {val:,.4f}, more than {DIVERGENCE_FACTOR:g} times "
                f"the best so far ({self.best:.4f})"
            )
        return None

    def diverged_message(self, what: str, step: int) -> str:
        """The one line TrainingDiverged carries: what went wrong at ``step``, and which checkpoint is kept."""
        return (
            f"training stopped at step {step}: {what}; {self.kept()}. Try a lower learning rate (--lr) "
            "or gradient clipping (--grad-clip)."
        )

    def kept(self) -> str:
        """Which checkpoint is kept: the better of the two on disk (path, step, value), or that none was written."""
        if not self.entries:
            where = "" if self.paths is None else f" in {Path(self.paths[0]).parent}"
            return f"no checkpoint was written{where}"
        kept = self.entries if self.paths is not None else self.entries[:1]  # a caller's save may keep one
        index = min(range(len(kept)), key=lambda i: kept[i][1])
        step, val = self.entries[index]
        which = f"that of step {step}" if self.paths is None else f"{self.paths[index]}, of step {step}"
        return f"the best checkpoint kept is {which} ({val:.4f} bits/byte)"
