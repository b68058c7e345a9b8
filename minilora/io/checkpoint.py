"""Checkpoints that are never half-written: one safetensors file, replaced atomically.

A checkpoint is a single ``.safetensors`` file holding the parameters (``params.<name>``), the
optimiser's buffers (``optim.<kind>.<name>``) and, in the file's string metadata, a JSON document
with the model config, the training state and provenance. A readable copy of that JSON is written
beside it (``<name>.json``); the safetensors file is the authority.

Writes go to a temporary file in the same directory, are flushed and fsynced, and then renamed over
the old file. A rename within one file system is atomic, so a crash or an error at any point leaves
either the old checkpoint or the new one, never a mixture or a truncated file. A training run keeps
the checkpoint before the current one too (``keep_previous``: ``x.safetensors`` is linked as
``x.previous.safetensors`` before it is replaced), so a checkpoint that turns out bad is not the only one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from ..backend import to_numpy
from .json_text import parse_json_object
from .safetensors_read import read_tensors

METADATA_KEY = "minilora"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit; the message names the file and the key."""


@dataclass
class Checkpoint:
    params: dict  # name -> host NumPy array
    optimizer: dict | None  # Optimizer.state_dict() layout, host arrays, or None
    metadata: dict  # config, training state, provenance


def write_all(fd: int, payload: bytes) -> None:
    """os.write until every byte is written (one call may write fewer)."""
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view) :]


def temp_path(path: Path) -> Path:
    """The temporary file an atomic write of ``path`` goes through: ``.<name>.tmp-<pid>`` beside it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>[0-9]+)")  # temp_path's names, for cleaning up


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the new one, nothing else.

    An OSError (a full disk, a read-only folder) names ``path``, which os.write and os.fsync do not.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                write_all(fd, payload)
                os.fsync(fd)  # the bytes are on disk before the name points at them
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # and the rename itself is on disk
        finally:
            os.close(directory)
    except OSError as err:
        message = f"cannot write {path}: {err.strerror or err}"
        raise (OSError(err.errno, message) if err.errno else OSError(message)) from err


def sidecar_path(path) -> Path:
    """The readable JSON beside a checkpoint: ``x.safetensors`` -> ``x.json``; refused for ``x.json`` itself."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if sidecar == path:
        raise CheckpointError(
            f"{path}: a checkpoint named .json would be overwritten by its own JSON sidecar; "
            "name it .safetensors"
        )
    return sidecar


def previous_path(path) -> Path:
    """Where the file before ``path``'s current one is kept: ``x.safetensors`` -> ``x.previous.safetensors``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def keep_previous(path, sidecar: bool = True) -> None:
    """Before ``path`` is replaced, make its current file ``previous_path(path)`` too (its JSON sidecar alike).

    A hard link (a copy where links are not supported) under a temporary name, renamed over the
    previous one: ``path`` itself is never missing, and the previous file is whole, old or older.
    """
    path = Path(path)
    pairs = [(path, previous_path(path))]
    if sidecar:
        pairs.append((sidecar_path(path), sidecar_path(previous_path(path))))
    for current, previous in pairs:
        if not current.is_file():
            continue
        staged = temp_path(previous)
        staged.unlink(missing_ok=True)
        try:
            os.link(current, staged)
        except OSError:
            shutil.copy2(current, staged)
        os.replace(staged, previous)


def save_checkpoint(path, params: dict, metadata: dict, optimizer_state: dict | None = None) -> None:
    """Save parameters, optional optimiser state and JSON-able metadata to ``path`` atomically."""
    sidecar = sidecar_path(path)  # checked before anything is written
    tensors = {f"params.{name}": to_numpy(value) for name, value in params.items()}
    if optimizer_state is not None:
        tensors.update({f"optim.{key}": to_numpy(value) for key, value in optimizer_state["buffers"].items()})
        metadata = {**metadata, "optimizer_step_count": optimizer_state["step_count"]}
    document = json.dumps({"format_version": FORMAT_VERSION, **metadata}, indent=2, sort_keys=True)
    path = Path(path)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={METADATA_KEY: document}))
    atomic_write_bytes(sidecar, (document + "\n").encode())


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; a clear CheckpointError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    tensors, header = read_tensors(
        path, CheckpointError, "checkpoint"
    )  # BF16 as float32; F8 refused, by name
    if METADATA_KEY not in header:
        raise CheckpointError(
            f"{path} is a safetensors file but not a minilora checkpoint (no {METADATA_KEY!r} metadata)"
        )
    metadata = parse_json_object(header[METADATA_KEY], f"checkpoint {path}'s metadata", CheckpointError)
    params = {key[len("params.") :]: value for key, value in tensors.items() if key.startswith("params.")}
    buffers = {key[len("optim.") :]: value for key, value in tensors.items() if key.startswith("optim.")}
    optimizer = None
    if "optimizer_step_count" in metadata:
        optimizer = {"step_count": metadata["optimizer_step_count"], "buffers": buffers}
    return Checkpoint(params=params, optimizer=optimizer, metadata=metadata)


def metadata_document(path: Path) -> str | None:
    """The JSON text a checkpoint file holds in its metadata, read from its header alone; None if it has none."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get(METADATA_KEY)
    except (OSError, SafetensorError):
        return None


def document_kind(document: str):
    """The ``kind`` a checkpoint's metadata document records (None if it records none, or is no JSON object)."""
    try:
        parsed = json.loads(document)
    except ValueError:
        return None
    return parsed.get("kind") if isinstance(parsed, dict) else None


def checkpoint_output_state(path, command: str, written_kind: str) -> tuple[list[str], str | None]:
    """(what exists of the output ``path`` and its sidecar, why it may not be replaced or None).

    Only a checkpoint whose metadata says ``written_kind`` (what ``command`` writes: "merged" for
    merge) may be replaced, and a JSON sidecar beside it only if it is that checkpoint's own: a
    pretraining checkpoint replaced by a merge loses its optimiser state, a user's ``x.json`` is theirs.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    held = [p.name for p in (path, sidecar) if p.exists()]
    if path.is_dir():
        return held, "is a folder, not a checkpoint file"
    document = metadata_document(path) if path.is_file() else None
    if path.exists() and document is None:
        return held, f"is not a checkpoint minilora {command} wrote"
    if document is not None and (kind := document_kind(document)) != written_kind:
        return held, f"is a {kind!r} checkpoint, not one minilora {command} wrote"
    if sidecar.exists() and (document is None or sidecar.read_bytes() != (document + "\n").encode()):
        return held, f"would take {sidecar} as its JSON sidecar, a file minilora {command} did not write"
    return held, None


BLOCK_NAME = re.compile(r"transformer\.h\.(\d+)\.")  # a GPT block's parameters: transformer.h.<i>.


def check_blocks_present(n_layer: int, names, source) -> None:
    """Raise CheckpointError unless ``names`` hold the blocks 0 .. n_layer - 1 of a GPT, and no others.

    A config's n_layer sizes everything built from it (its parameter_shapes() is a dict of 12 n_layer
    names), so a file claiming n_layer = 3,000,000 beside two blocks of tensors would cost minutes
    and gigabytes before check_params_fit could object. This costs one pass over the names present.
    """
    blocks = {int(match.group(1)) for name in names if (match := BLOCK_NAME.match(name))}
    if len(blocks) != n_layer or (blocks and (min(blocks) != 0 or max(blocks) != n_layer - 1)):
        held = f"blocks {sorted(blocks)[:3]}{'...' if len(blocks) > 3 else ''}" if blocks else "no blocks"
        raise CheckpointError(
            f"{source}: its config claims n_layer={n_layer}, but its tensors hold {len(blocks)} "
            f"({held}, named transformer.h.<i>.)"
        )


def check_params_fit(params: dict, expected_shapes: dict, source) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped parameter."""
    for name, shape in expected_shapes.items():
        if name not in params:
            raise CheckpointError(f"{source}: missing parameter {name!r} (expected shape {shape})")
        if tuple(params[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: parameter {name!r} has shape {tuple(params[name].shape)}, "
                f"the model expects {tuple(shape)}"
            )
    unexpected = sorted(set(params) - set(expected_shapes))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected parameters {unexpected}")


def check_optimizer_state(state: dict | None, names, kinds, source) -> None:
    """Raise CheckpointError unless ``state`` holds every buffer of ``kinds`` for every name in ``names``.

    A resumed optimiser missing a buffer would start it from zero without a word, and the resumed
    run would no longer be the run that was saved. ``kinds``: the optimiser's ``state_names``.
    """
    if state is None:
        raise CheckpointError(f"{source} holds no optimiser state, so it cannot be resumed exactly")
    missing = [
        f"{kind}.{name}" for kind in kinds for name in names if f"{kind}.{name}" not in state["buffers"]
    ]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{source} lacks the optimiser state {missing[0]!r}{more}, so it cannot be resumed exactly"
        )


def resolve_checkpoint_path(path) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoint.safetensors``."""
    path = Path(path)
    return path / "checkpoint.safetensors" if path.is_dir() else path


def load_model(path, device: str | None = None, dtype=np.float32):
    """A GPT holding a checkpoint's weights on ``device``, every parameter checked by name and shape.

    Weights stored in another precision (a float16 base model, say) are cast to ``dtype`` to compute.
    """
    from ..backend import to_device
    from ..config import GPTConfig
    from ..model import GPT

    path = resolve_checkpoint_path(path)
    checkpoint = load_checkpoint(path)
    if "config" not in checkpoint.metadata:
        raise CheckpointError(f"{path} has no model config in its metadata")
    config = GPTConfig.from_dict(checkpoint.metadata["config"])
    check_blocks_present(config.n_layer, checkpoint.params, path)  # before anything sized by the config
    shapes = config.parameter_shapes()
    check_params_fit(checkpoint.params, shapes, path)
    return GPT(config, {name: to_device(checkpoint.params[name].astype(dtype), device) for name in shapes})
