"""A training job's run: its folder claimed, the state it resumes from, and what resuming checks.

``claimed_run`` is what ``pretrain`` and ``finetune`` both do before they train. Under ``mpirun``
rank 0 alone claims the output folder (io/run_folder.py: the refusal of a folder that is or holds
an input, the lock, the writability probe, the refusal of a folder that holds a run unless the job
resumes or overwrites it); with ``resume`` the saved state is loaded and must be the job's own
kind. The ``TrainingRun`` it yields resumes the optimiser, trains with rank 0 alone saving and
printing, and writes the job's results file. A run that replaces another (``overwrite``) writes
beside it and takes its place when it ends, or when it stops diverged with a checkpoint saved.

Resuming is exact only if everything the loop needs comes back: the trainable weights, every
optimiser buffer and the step (the batches and dropout masks are functions of seed and step).
A checkpoint that lacks a buffer, or a ``--steps`` that leaves nothing to train, is refused here
with the checkpoint named, instead of resuming into a run that is not the one that was saved; so
is a saved state with a field missing or one this minilora does not know (``saved_fields``): a
field dropped or defaulted would resume another run.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

from ..fast.distributed.world import World, current_world
from ..io.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_bytes,
    check_optimizer_state,
    load_checkpoint,
    previous_path,
)
from ..io.run_folder import RunFolder, claim_run_folder
from ..training.loop import TrainingDiverged, TrainSettings, train_loop


@dataclass(frozen=True)
class TrainingRun:
    """A job's claimed output folder and the state it resumes from (None for a new run)."""

    folder: Path  # where the run writes: ``out``, or a staging folder beside it while it replaces a run
    out: Path  # the folder named by --out, where the run's files are once it ends
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
              report: bool, kept_name: str | None = None):  # fmt: skip
        """``train_loop`` from ``start_step`` with the device's ``step``; rank 0 alone saves, shows and reports.

        ``kept_name``: the file of the run's results that a divergence message names (default: the
        state's), with its previous version beside it (io/checkpoint.keep_previous).
        """
        writer = self.world.is_writer
        kept = self.out / (kept_name or self.state_path.name)
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
            saved=None if self.state is None else (start_step, resumed_value(self.state)),
            checkpoint_paths=(kept, previous_path(kept)),
        )

    def write_results(self, name: str, results: dict) -> None:
        """``results`` as indented JSON in ``<folder>/<name>``, written atomically by rank 0 alone."""
        if self.world.is_writer:
            atomic_write_bytes(self.folder / name, (json.dumps(results, indent=2) + "\n").encode())


def resumed_value(checkpoint) -> float:
    """The validation bits per byte a resumed checkpoint was saved with (infinite if it records none)."""
    return float(checkpoint.metadata.get("val_bits_per_byte", math.inf))


@contextmanager
def claimed_run(out_dir, run_files, state_name: str, kind: str, resume: bool, overwrite: bool, inputs=()):
    """Claim ``out_dir`` for a run of the job ``kind`` for the ``with`` block; yields its TrainingRun.

    ``run_files``: the names that mark the folder as holding a run; ``state_name``: the checkpoint
    the job saves and, with ``resume``, continues from (loaded here, its kind checked); ``inputs``:
    (flag, path) pairs of what the job reads, which ``out_dir`` must neither be nor hold.
    """
    out = Path(out_dir)
    world = current_world()  # under mpirun: every rank trains, rank 0 alone writes (fast/distributed)
    claim = claim_run_folder(out, run_files, resume, overwrite, inputs) if world.is_writer else None
    with claim or nullcontext(RunFolder(out)) as claimed:
        state_path = claimed.path / state_name
        state = load_checkpoint(state_path) if resume else None
        if state is not None:
            check_kind(state, state_path, kind)
        try:
            yield TrainingRun(claimed.path, out, state_path, state, world)
        except TrainingDiverged:
            if state_path.exists():  # the run is over and keeps its best checkpoint: it replaces the old one
                claimed.finish()
            raise


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
    check_saved_fields(meta, ("step",), path)
    step = int(meta["step"])
    if steps <= step:
        raise CheckpointError(
            f"{path} is at step {step} already and --steps {steps} leaves nothing to train: "
            f"--steps is the total, give more than {step}"
        )
    return step


def check_saved_fields(metadata: dict, names, path) -> None:
    """CheckpointError naming the fields of ``names`` that the state file ``path``'s metadata lacks."""
    missing = [name for name in names if name not in metadata]
    if missing:
        raise CheckpointError(
            f"{path} lacks the field {missing[0]!r} that resuming needs"
            f"{f' (and {missing[1:]})' if missing[1:] else ''}: it was not saved by this minilora's "
            "training, so it cannot be resumed"
        )


def saved_fields(values, cls, what: str, path) -> dict:
    """``values``, checked to hold exactly the fields of the dataclass ``cls``; else CheckpointError naming one.

    ``what``: how the message names the values ("its saved settings"); ``path``: the state file.
    A field too many is not dropped and one too few is not defaulted: either would resume another run.
    """
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: {what} are not a mapping of fields, got {type(values).__name__}")
    known = [field.name for field in fields(cls)]
    unknown = sorted(str(name) for name in values if name not in known)
    missing = [name for name in known if name not in values]
    if unknown:
        raise CheckpointError(
            f"{path}: {what} hold the unknown field {unknown[0]!r} ({cls.__name__} has {known}): "
            "it was saved by another minilora, so it cannot be resumed"
        )
    if missing:
        raise CheckpointError(f"{path}: {what} lack the field {missing[0]!r}, so it cannot be resumed")
    return values


def saved_settings(values, path) -> TrainSettings:
    """The TrainSettings a state file records, every field present and known; else CheckpointError naming it."""
    try:
        return TrainSettings(**saved_fields(values, TrainSettings, "its saved settings", path))
    except ValueError as err:
        raise CheckpointError(f"{path}: its saved settings: {err}") from err


def saved_config(cls, values, path):
    """The config (``cls``: GPTConfig, LoraConfig) a state file records; CheckpointError naming the bad field."""
    try:
        return cls.from_dict(values)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err


def resuming_line(step: int, steps: int, path) -> str:
    """What a resumed run prints first: the step it continues from, of how many, and the checkpoint."""
    return f"resuming from step {step} of {steps} ({path})"
