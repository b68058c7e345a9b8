"""What resuming a run checks before it trains: the checkpoint's kind, its optimiser state, the steps left.

Resuming is exact only if everything the loop needs comes back: the trainable weights, every
optimiser buffer and the step (the batches and dropout masks are functions of seed and step).
A checkpoint that lacks a buffer, or a ``--steps`` that leaves nothing to train, is refused here
with the checkpoint named, instead of resuming into a run that is not the one that was saved.
"""

from __future__ import annotations

from ..io.checkpoint import CheckpointError, check_optimizer_state


def check_kind(checkpoint, path, kind: str) -> dict:
    """The metadata of ``checkpoint`` (loaded from ``path``), if the job ``kind`` wrote it."""
    meta = checkpoint.metadata
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint (kind {meta.get('kind')!r})")
    return meta


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
    return f"resuming from step {step} of {steps} ({path})"
