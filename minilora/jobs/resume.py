"""A training job's run: its folder claimed, the state it resumes from, and what resuming checks.

``claimed_run`` is what ``pretrain`` and ``finetune`` both do before they train. Under ``mpirun``
rank 0 alone claims the output folder (io/run_folder.py: the lock, the writability probe, the
refusal of a folder that holds a run unless the job resumes or overwrites it); with ``resume`` the
saved state is loaded and must be the job's own kind. The ``TrainingRun`` it yields resumes the
optimiser, trains with rank 0 alone saving and printing, and writes the job's results file.

Resuming is exact only if everything the loop needs comes back: the trainable weights, every
optimiser buffer and the step (the batches and dropout masks are functions of seed and step).
A checkpoint that lacks a buffer, or a ``--steps`` that leaves nothing to train, is refused here
with the checkpoint named, instead of resuming into a run that is not the one that was saved.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from ..fast.distributed.world import World, current_world
from ..io.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_bytes,
    check_optimizer_state,
    load_checkpoint,
)
from ..io.run_folder import claim_run_folder
from ..training.loop import train_loop


@dataclass(frozen=True)
class TrainingRun:
    """A job's claimed output folder and the state it resumes from (None for a new run)."""

    folder: Path
    state_path: Path  # the checkpoint a resumed run continues from, and the one the run saves
    state: Checkpoint | None
    world: World

    def resume_optimizer(self, optimizer, steps: int, say) -> int:
        """The step training starts at: 0 for a new run, else the saved one, with the optimiser's state loaded.

        ``steps``: the total step count asked for; ``say`` prints the "resuming from step N" line.
        """
        if self.state is None:
            return 0
        start_step = check_resumable(self.state, self.state_path, optimizer, steps)
        optimizer.load_state_dict(self.state.optimizer)
        if self.world.is_writer:
            say(resuming_line(start_step, steps, self.state_path))
        return start_step

    def train(self, model, optimizer, corpus, settings, save, start_step: int, step, progress: bool,
              report: bool):  # fmt: skip
        """``train_loop`` from ``start_step`` with the device's ``step``; rank 0 alone saves, shows and reports."""
        writer = self.world.is_writer
        return train_loop(
            model,
            optimizer,
            corpus,
            settings,
            save if writer else None,
            start_step,
            progress and writer,
            report=report and writer,
            step=step,
            saved_step=start_step if self.state is not None else None,
            saved_in=self.folder,
        )

    def write_results(self, name: str, results: dict) -> None:
        """``results`` as indented JSON in ``<folder>/<name>``, written atomically by rank 0 alone."""
        if self.world.is_writer:
            atomic_write_bytes(self.folder / name, (json.dumps(results, indent=2) + "\n").encode())


@contextmanager
def claimed_run(out_dir, run_files, state_name: str, kind: str, resume: bool, overwrite: bool):
    """Claim ``out_dir`` for a run of the job ``kind`` for the ``with`` block; yields its TrainingRun.

    ``run_files``: the names that mark the folder as holding a run; ``state_name``: the checkpoint
    the job saves and, with ``resume``, continues from (loaded here, its kind checked).
    """
    folder = Path(out_dir)
    world = current_world()  # under mpirun: every rank trains, rank 0 alone writes (fast/distributed)
    claim = claim_run_folder(folder, run_files, resume, overwrite) if world.is_writer else nullcontext()
    with claim:
        state_path = folder / state_name
        state = load_checkpoint(state_path) if resume else None
        if state is not None:
            check_kind(state, state_path, kind)
        yield TrainingRun(folder, state_path, state, world)


def check_kind(checkpoint, path, kind: str) -> None:
    """CheckpointError unless the job ``kind`` wrote ``checkpoint`` (loaded from ``path``)."""
    written_by = checkpoint.metadata.get("kind")
    if written_by != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint (kind {written_by!r})")


def check_resumable(checkpoint, path, optimizer, steps: int) -> int:
    """The step ``checkpoint`` (loaded from ``path``) resumes at; CheckpointError if it cannot.

    ``optimizer``: the fresh optimiser its state goes into (its trainable names and buffer kinds
    are checked); ``steps``: the total step count asked for.
    """
    meta = checkpoint.metadata
    check_optimizer_state(checkpoint.optimizer, optimizer.names, optimizer.state_names, path)
    step = int(meta["step"])
    if steps <= step:
        raise CheckpointError(
            f"{path} is at step {step} already and --steps {steps} leaves nothing to train: "
            f"--steps is the total, give more than {step}"
        )
    return step


def resuming_line(step: int, steps: int, path) -> str:
    """What a resumed run prints first: the step it continues from, of how many, and the checkpoint."""
    return f"resuming from step {step} of {steps} ({path})"
