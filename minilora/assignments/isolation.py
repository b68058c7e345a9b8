"""How far a student's code is kept from the grader: three levels, chosen once per grading process.

- ``namespaces``: the child runs in its own PID, mount, network and IPC namespaces (the ``unshare``
  command of util-linux). It sees only its own processes, has no network, and finds the whole file
  system read-only except its own part folder; minilora's package folder shows the student build
  (student_build.py) and the paths the grader hides (a roster, the source tree's .git, Gradescope's
  source folder) show empty folders. Killing the namespace's first process kills everything in it,
  grandchildren that called ``setsid`` included. As root the child also runs as the sandbox user; as
  any other user it runs in a user namespace with every capability dropped.
- ``user``: root without namespaces: the child runs as the sandbox user, so it cannot write the
  grader's files, signal the grader or read its ``/proc`` entries; it can still read what every user
  may read.
- ``process``: an ordinary user without namespaces: the child runs as the grader's own user, in its
  own session, with a minimal environment; the grader is non-dumpable (its ``/proc`` entries are
  closed to same-user code) and accepts a score only with a nonce no argv shows. Same-user code can
  still write whatever the grader's user can write: the grader files' hashes (integrity.py) catch a
  tampered grader, and a roster is read into memory before any submission runs.

Root without a sandbox user is refused: untrusted code never runs as root. docs/instructors.md
says what each level does and does not prevent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from .sandbox import probe_command

SANDBOX_USER_ENV_VAR = "MINILORA_SANDBOX_USER"  # names the user the children run as (the grader is root)
DEFAULT_SANDBOX_USER = "minilora-sandbox"  # created when the grader is root and no user is named
NAMESPACE_FLAGS = ["--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36


class RefusedToGrade(RuntimeError):
    """Grading would run untrusted code with more power than it may have; the message says why."""


@dataclass(frozen=True)
class Isolation:
    level: str  # "namespaces", "user" or "process"
    uid: int | None = None  # the sandbox user's ids (None: the grader's own user)
    gid: int | None = None
    user_name: str | None = None

    def describe(self) -> str:
        """One line for the score: the level and what it means."""
        user = f" as user {self.user_name}" if self.user_name else ""
        return {
            "namespaces": f"namespaces{user} (own PID, mount and network namespaces; read-only file system)",
            "user": f"user{user} (a separate user; no namespaces were available)",
            "process": "process (the grader's own user: own session, minimal environment, non-dumpable grader)",
        }[self.level]

    def wrap(self, command: list) -> list:
        """The command that starts a child at this level."""
        if self.level != "namespaces":
            return command
        as_user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        return [shutil.which("unshare"), *as_user, *NAMESPACE_FLAGS, *command]

    def popen_arguments(self) -> dict:
        """``Popen`` arguments: the user for the ``user`` level (the namespace child switches itself)."""
        if self.level == "user":
            return {"user": self.uid, "group": self.gid, "extra_groups": []}
        return {}


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def harden_grader() -> None:
    """Make this process non-dumpable (same-user code cannot open its /proc entries or ptrace it) and
    the reaper of its orphaned descendants (so a grandchild that left its session is still found)."""
    if not sys.platform.startswith("linux"):
        return
    libc = _libc()
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def sandbox_user(name: str | None = None):
    """The sandbox user's passwd record: ``name``, else MINILORA_SANDBOX_USER, else DEFAULT_SANDBOX_USER,
    created with ``useradd`` when missing. Raises RefusedToGrade when there is none to be had."""
    import pwd

    name = name or os.environ.get(SANDBOX_USER_ENV_VAR) or DEFAULT_SANDBOX_USER
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if name == DEFAULT_SANDBOX_USER and shutil.which("useradd"):
        command = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
        subprocess.run(command, capture_output=True)
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    raise RefusedToGrade(
        f"refusing to grade as root: there is no sandbox user {name!r} to run the student's code as "
        "(pass --sandbox-user NAME, naming an existing unprivileged user)"
    )


@functools.cache
def namespaces_work(as_root: bool, uid: int | None, gid: int | None) -> bool:
    """Whether a namespace child starts here: one probe per process, through the real launch path."""
    if not sys.platform.startswith("linux") or not shutil.which("unshare"):
        return False
    probe = Isolation("namespaces", uid, gid)
    completed = subprocess.run(probe.wrap(probe_command(uid, gid)), capture_output=True, timeout=60)
    return completed.returncode == 0 and completed.stdout.strip() == b"isolated"


def choose_isolation(sandbox_user_name: str | None = None, allow_namespaces: bool = True) -> Isolation:
    """The strongest level this machine allows (see the module docstring)."""
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if sandbox_user_name and not as_root:
        raise RefusedToGrade(f"--sandbox-user {sandbox_user_name} needs the grader to run as root")
    uid = gid = name = None
    if as_root:
        record = sandbox_user(sandbox_user_name)
        uid, gid, name = record.pw_uid, record.pw_gid, record.pw_name
    if allow_namespaces and namespaces_work(as_root, uid, gid):
        return Isolation("namespaces", uid, gid, name)
    return Isolation("user", uid, gid, name) if as_root else Isolation("process")
