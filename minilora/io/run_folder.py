"""Run folders that a run never loses: one writer at a time, no silent overwrite, a writable disk.

A training job claims its output folder before it trains (``claim_run_folder``), in four steps:

1. a lock: ``fcntl.flock`` on ``<folder>/.minilora.lock``, held until the job ends, so a second
   process writing the same folder is refused at once (its checkpoints would interleave with
   ours and the step could move backwards). The lock file records the holder's pid for the
   message and is removed at the end; the operating system drops the lock when the holder
   exits, however it exits (a killed run leaves the file, unlocked, for the next run to take).
2. a probe: a temporary file created, written, flushed and removed, so that a read-only or
   missing folder is found before the training, not at the first save after it.
3. leftovers: temporary files of atomic writes (``.<name>.tmp-<pid>``, checkpoint.temp_path)
   whose writer is no longer alive are removed; nothing else is touched.
4. the refusal: a folder that already holds a run's files is refused unless the job resumes it
   or was told to replace it (``overwrite``: those files, and only those, are removed first).

A folder whose files only make sense together (a PEFT adapter's weights and config) is written
whole instead (``write_folder_whole``): into a temporary folder beside it, then renamed into place.

Locks are advisory and POSIX: without ``fcntl`` (Windows) step 1 is skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import TEMP_NAME, temp_path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, a second writer is not detected
    fcntl = None

LOCK_NAME = ".minilora.lock"


class RunFolderError(ValueError):
    """An output folder is in use, holds a run already, or cannot be written; the message names it."""


def cannot_write(directory, err: OSError) -> RunFolderError:
    return RunFolderError(f"cannot write to {directory}: {err.strerror or err}")


@contextmanager
def folder_lock(directory):
    """Hold an exclusive lock on ``directory`` for the ``with`` block; refuse if another process has it."""
    directory = Path(directory)
    lock_path = directory / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise cannot_write(directory, err) from err
    locked = False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # never wait: refuse at once
            except BlockingIOError:
                raise in_use(directory, os.pread(fd, 32, 0)) from None
            if not same_file(fd, lock_path):  # its holder removed it as we opened it: it is another's now
                raise in_use(directory, b"")
        locked = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if locked:
            lock_path.unlink(missing_ok=True)  # before the lock goes, so no one locks a removed file
        os.close(fd)  # closing the descriptor releases the lock


def in_use(directory, holder: bytes) -> RunFolderError:
    pid = holder.decode(errors="replace").strip()
    by = f" (pid {pid})" if pid.isdigit() else ""
    return RunFolderError(
        f"{directory} is in use by another run{by}; wait for it to end or choose another --out"
    )


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


def remove_stale_temp_files(directory) -> list[Path]:
    """Remove the temporary files of atomic writes in ``directory`` whose writer has died; returns them."""
    removed = []
    for path in sorted(Path(directory).iterdir()):
        match = TEMP_NAME.fullmatch(path.name)
        if match and path.is_file() and not pid_alive(int(match["pid"])):
            path.unlink()
            removed.append(path)
    return removed


@contextmanager
def claim_run_folder(directory, run_files, resume: bool = False, overwrite: bool = False):
    """Lock, probe and clean ``directory`` (made if missing) for a run that writes ``run_files``.

    A folder holding any of ``run_files`` is refused unless ``resume`` (the job continues that run)
    or ``overwrite`` (those files are removed before training starts). Yields the folder's Path.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise cannot_write(directory, err) from err
    with folder_lock(directory):
        probe_writable(directory)
        remove_stale_temp_files(directory)
        existing = [name for name in run_files if (directory / name).exists()]
        if existing and not (resume or overwrite):
            raise RunFolderError(
                f"{directory} holds a run already ({', '.join(existing)}); pass --resume to continue it "
                "or --overwrite to replace it"
            )
        if overwrite:
            for name in existing:
                (directory / name).unlink()
        yield directory


def write_folder_whole(directory, write, replaceable, overwrite: bool = False) -> Path:
    """Have ``write(folder)`` fill a new folder, then put it at ``directory`` by renaming it whole.

    Readers see the old folder or the new one, never a mixture: the files are written into
    ``.<name>.tmp-<pid>`` beside ``directory`` first. A ``directory`` that holds files is refused
    unless ``overwrite``, and even then if it holds anything but the names in ``replaceable``. It
    is renamed aside, the new folder renamed in and the old one removed; a crash in between leaves
    the old folder complete as ``.<name>.old-<pid>``.
    """
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise RunFolderError(f"{directory} is a file, not a folder")
    held = sorted(path.name for path in directory.iterdir()) if directory.exists() else []
    if held and not overwrite:
        raise RunFolderError(f"{directory} is not empty ({', '.join(held)}); pass --overwrite to replace it")
    foreign = [name for name in held if name not in replaceable]
    if foreign:
        raise RunFolderError(f"{directory} holds other files ({', '.join(foreign)}); choose another --out")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_path(directory)
    if staging.exists():  # left by this very process (the pid is ours) after an earlier failure
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        write(staging)
        if held:
            aside = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, aside)
            os.replace(staging, directory)
            shutil.rmtree(aside)
        else:
            os.replace(staging, directory)  # an empty folder is replaced in one rename
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory
