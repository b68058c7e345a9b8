"""Outputs that a command never loses: one writer at a time, no silent overwrite, a writable disk.

Every command that takes ``--out`` first refuses an output that is one of its own inputs, or a
folder holding one (``refuse_output_over_inputs``): ``finetune --base runs/x --out runs/x`` would
otherwise write over the base it is about to read.

A training job claims its output folder before it trains (``claim_run_folder``), in four steps:

1. a lock: ``fcntl.flock`` on ``<folder>/.minilora.lock``, held until the job ends, so a second
   process writing the same folder is refused at once (its checkpoints would interleave with
   ours and the step could move backwards). The lock file records the holder's pid for the
   message and is removed at the end; the operating system drops the lock when the holder
   exits, however it exits (a killed run leaves the file, unlocked, for the next run to take).
2. a probe: a temporary file created, written, flushed and removed, so that a read-only or
   missing folder is found before the training, not at the first save after it.
3. leftovers: temporary files of atomic writes (``.<name>.tmp-<pid>``, checkpoint.temp_path)
   and the staging folder of a replacing run beside it, whose writer is no longer alive, are
   removed; nothing else is touched.
4. the refusal: a folder that already holds a run's files is refused unless the job resumes it
   or was told to replace it (``overwrite``). A replacing run writes into a staging folder beside
   (``.<name>.tmp-<pid>``) and is swapped in when it ends; until then the old run stays whole,
   and a run that fails or is killed leaves it as it was. A folder holding anything but a run's
   files is not minilora's to replace, and is refused even then.

The result of a conversion (``merge``, ``export-peft``, ``import-peft``) is claimed the same way
(``claimed_output``): a lock beside it (``.<name>.lock``), and an existing result replaced only
with ``overwrite``, only if minilora's same command wrote it, and only once the new one is
complete. A folder whose files only make sense together (a PEFT adapter's weights and config, a
Hugging Face checkpoint's) is written whole (``write_folder_whole``): into a staging folder beside
it, with a manifest (``.minilora-output.json``: the command, the files) that says it is
minilora's, then renamed into place. Readers see the old folder or the new one, never a mixture.

Locks are advisory and POSIX: without ``fcntl`` (Windows) no second writer is detected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import TEMP_NAME, atomic_write_bytes, temp_path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, a second writer is not detected
    fcntl = None

LOCK_NAME = ".minilora.lock"
MANIFEST_NAME = ".minilora-output.json"  # in a folder written whole: which command wrote it, which files


class RunFolderError(ValueError):
    """An output is in use, holds a result already, is an input, or cannot be written; the message names it."""


def cannot_write(directory, err: OSError) -> RunFolderError:
    return RunFolderError(f"cannot write to {directory}: {err.strerror or err}")


def refuse_output_over_inputs(out, inputs) -> None:
    """RunFolderError if ``out`` is one of ``inputs`` or a folder holding one, before anything is written.

    ``inputs``: (flag, path) pairs of what the command reads, e.g. ("--base", "runs/x"); a path of
    None (smollm2, fetched later) or of no file (the read fails, naming it) is skipped. Paths are
    compared resolved, symbolic links followed.
    """
    target = Path(out).resolve()
    for flag, path in inputs:
        if path is None or not Path(path).exists():
            continue
        read = Path(path).resolve()
        if read == target or target in read.parents:
            relation = "is" if read == target else "holds"
            raise RunFolderError(
                f"--out {out} {relation} the {flag} input {path}: writing there would destroy what this "
                "command reads; choose another --out"
            )


@contextmanager
def folder_lock(directory):
    """Hold an exclusive lock on ``directory`` for the ``with`` block; refuse if another process has it."""
    with path_lock(Path(directory) / LOCK_NAME, directory):
        yield


@contextmanager
def path_lock(lock_path: Path, locked_thing):
    """Hold an exclusive lock on the file ``lock_path`` for the ``with`` block; messages name ``locked_thing``."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise cannot_write(lock_path.parent, err) from err
    locked = False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # never wait: refuse at once
            except BlockingIOError:
                raise in_use(locked_thing, os.pread(fd, 32, 0)) from None
            if not same_file(fd, lock_path):  # its holder removed it as we opened it: it is another's now
                raise in_use(locked_thing, b"")
        locked = True
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:  # a full disk: the pid cannot be recorded, so the folder is no place to write
            raise cannot_write(locked_thing, err) from err
        yield
    finally:
        if locked and same_file(fd, lock_path):  # a folder swapped in under us holds no lock of ours
            lock_path.unlink(missing_ok=True)  # before the lock goes, so no one locks a removed file
        os.close(fd)  # closing the descriptor releases the lock


def in_use(thing, holder: bytes) -> RunFolderError:
    pid = holder.decode(errors="replace").strip()
    by = f" (pid {pid})" if pid.isdigit() else ""
    return RunFolderError(f"{thing} is in use by another run{by}; wait for it to end or choose another --out")


def same_file(fd: int, path: Path) -> bool:
    """True if ``path`` still names the file open as ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def probe_writable(directory) -> None:
    """Create, write, flush and remove a temporary file in ``directory``; RunFolderError if that fails."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".minilora-probe-", dir=directory)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise cannot_write(directory, err) from err


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


def dead_writers_temp(path: Path) -> bool:
    """True if ``path`` is named as a temporary of temp_path and its writer has died."""
    match = TEMP_NAME.fullmatch(path.name)
    return bool(match) and not pid_alive(int(match["pid"]))


def remove_stale_temp_files(directory) -> list[Path]:
    """Remove the temporary files of atomic writes in ``directory`` whose writer has died; returns them."""
    removed = []
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and dead_writers_temp(path):
            path.unlink()
            removed.append(path)
    return removed


def remove_stale_staging(target: Path) -> None:
    """Remove the staging folders of ``target`` (``.<name>.tmp-<pid>`` beside it) whose writer has died."""
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        if path.is_dir() and dead_writers_temp(path):
            shutil.rmtree(path)


def swap_folder(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``: the old one renamed aside, the new one renamed in, the old removed.

    A crash between the two renames leaves the old folder whole as ``.<name>.old-<pid>``.
    """
    if not target.exists():
        os.replace(new, target)
        return
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside)


class RunFolder:
    """Where a claimed run writes: its folder (``final``), or a staging folder beside it while it replaces a run.

    ``finish`` swaps the staging folder in (the run is complete); ``discard`` removes it (the run
    failed), leaving the old run as it was. For a run written in place both do nothing.
    """

    def __init__(self, final: Path, replacing: bool = False):
        self.final = final
        self.path = temp_path(final) if replacing else final
        if replacing:  # claim_run_folder has removed a dead writer's staging folder already
            try:
                self.path.mkdir()
            except OSError as err:
                raise cannot_write(final.parent, err) from err

    def finish(self) -> None:
        if self.path != self.final and self.path.exists():
            swap_folder(self.path, self.final)

    def discard(self) -> None:
        if self.path != self.final and self.path.exists():
            shutil.rmtree(self.path)


def foreign_names(directory: Path, run_files) -> list[str]:
    """What ``directory`` holds besides a run's files, its lock and temporary files: none of minilora's doing."""
    ours = {*run_files, LOCK_NAME}
    return sorted(
        p.name for p in directory.iterdir() if p.name not in ours and not TEMP_NAME.fullmatch(p.name)
    )


@contextmanager
def claim_run_folder(directory, run_files, resume: bool = False, overwrite: bool = False, inputs=()):
    """Lock, probe and clean ``directory`` (made if missing) for a run that writes ``run_files``.

    ``directory`` must not be, nor hold, one of ``inputs`` ((flag, path) pairs). A folder holding
    any of ``run_files`` is refused unless ``resume`` (the job continues that run) or ``overwrite``
    (the new run is written beside and replaces the folder when the ``with`` block ends without an
    error; refused if the folder holds anything else). Yields the RunFolder to write into.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one")
    refuse_output_over_inputs(directory, inputs)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise cannot_write(directory, err) from err
    with folder_lock(directory):
        probe_writable(directory)
        remove_stale_temp_files(directory)
        remove_stale_staging(directory)  # a killed replacing run's, beside the folder
        existing = [name for name in run_files if (directory / name).exists()]
        if existing and not (resume or overwrite):
            raise RunFolderError(
                f"{directory} holds a run already ({', '.join(existing)}); pass --resume to continue it "
                "or --overwrite to replace it"
            )
        foreign = foreign_names(directory, run_files) if existing and overwrite else []
        if foreign:
            raise RunFolderError(
                f"{directory} holds files that are not a minilora run's ({', '.join(foreign)}); "
                "--overwrite replaces only a run folder: choose another --out"
            )
        folder = RunFolder(directory, replacing=bool(existing) and overwrite)
        try:
            yield folder
        except BaseException:
            folder.discard()
            raise
        folder.finish()


def manifest_problem(directory: Path, kind: str) -> str | None:
    """Why the folder ``directory`` is not a result of minilora's ``kind`` (by its manifest), or None."""
    held = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST_NAME)
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        written_by, files = manifest["written_by"], set(manifest["files"])
    except (OSError, ValueError, TypeError, KeyError):
        return f"holds files minilora {kind} did not write ({', '.join(held)})"
    if written_by != f"minilora {kind}":
        return f"was written by {written_by}, not by minilora {kind}"
    others = [name for name in held if name not in files]
    if others:
        return f"holds files minilora {kind} did not write ({', '.join(others)})"
    return None


def folder_output_state(path: Path, kind: str) -> tuple[list[str], str | None]:
    """(what the output folder ``path`` holds, why it may not be replaced or None) for a folder result."""
    if not path.exists():
        return [], None
    if not path.is_dir():
        return [path.name], f"is a file, not a folder minilora {kind} wrote"
    held = sorted(p.name for p in path.iterdir())
    return held, manifest_problem(path, kind) if held else None


def refuse_existing_output(path, kind: str, overwrite: bool, state=folder_output_state) -> None:
    """RunFolderError if ``path`` holds a result: always if minilora's ``kind`` did not write it.

    A result that it wrote is refused unless ``overwrite``. ``state(path, kind)``: (the names held
    there, why they may not be replaced or None).
    """
    path = Path(path)
    held, problem = state(path, kind)
    if not held:
        return
    if problem is not None:
        raise RunFolderError(
            f"{path} {problem}; it is not replaced even with --overwrite: choose another --out"
        )
    if not overwrite:
        raise RunFolderError(
            f"{path} holds the result of an earlier minilora {kind} ({', '.join(held)}); "
            "pass --overwrite to replace it"
        )


def check_output(out, kind: str, overwrite: bool, inputs, state=folder_output_state) -> None:
    """Before a command reads anything: refuse an ``out`` that is or holds one of ``inputs``, or a result there.

    The result is checked again, under the lock, when it is written (``claimed_output``).
    """
    refuse_output_over_inputs(out, inputs)
    refuse_existing_output(out, kind, overwrite, state)


@contextmanager
def claimed_output(path, kind: str, overwrite: bool = False, state=folder_output_state):
    """Lock the output ``path`` of the command ``kind`` (beside it) and refuse a result there; yields its Path.

    See refuse_existing_output for ``overwrite`` and ``state``. The caller writes it whole.
    """
    path = Path(path).absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise cannot_write(path.parent, err) from err
    with path_lock(path.with_name(f".{path.name}.lock"), path):
        refuse_existing_output(path, kind, overwrite, state)
        yield path


def write_folder_whole(directory, write, kind: str) -> Path:
    """Have ``write(folder)`` fill a new folder, add minilora's manifest, then swap it in at ``directory``.

    The files are written into ``.<name>.tmp-<pid>`` beside ``directory`` first; a failure or a
    kill at any point leaves ``directory`` as it was (a killed writer's staging folder is removed
    by the next write). The caller has claimed ``directory`` (``claimed_output``).
    """
    directory = Path(directory).absolute()
    remove_stale_staging(directory)
    staging = temp_path(directory)
    if staging.exists():  # left by this very process (the pid is ours) after an earlier failure
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        write(staging)
        manifest = {"written_by": f"minilora {kind}", "files": sorted(p.name for p in staging.iterdir())}
        atomic_write_bytes(staging / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()  # an empty folder (made by hand, or by a test) is replaced in one rename
        swap_folder(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def write_output_folder(directory, write, kind: str, overwrite: bool = False) -> Path:
    """Claim ``directory`` as the result of minilora's ``kind`` and write it whole (``write(folder)`` fills it)."""
    with claimed_output(directory, kind, overwrite) as path:
        return write_folder_whole(path, write, kind)
