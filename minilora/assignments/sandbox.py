"""Running a student's code in a child process that the grader talks to, so grading cannot be steered.

The grader (a pytest file, trusted) runs in one process; the student's modules are imported only in
a child process, one fresh child per graded part. The grader reaches them through proxies:
``student["gelu"].gelu_forward(x)`` sends the call to the child, which runs it and sends the result
back. Plain data crosses the boundary by value (NumPy arrays of numbers, Python numbers, strings,
None, and tuples, lists and dicts of them); anything else (a cache, a model) stays in the child and
comes back as a handle, which the grader can pass to later calls or call methods on.

Why: the child can do anything a Python program can, but only in the child. Whatever it prints is
discarded, and the parent reads its replies as JSON and NumPy's ``.npy`` bytes with pickling
refused, so a reply can carry numbers, never code. Each part's child gets a fresh folder of its own
(a private copy of the submission and an empty working folder, removed when the part ends), a
minimal environment, its own session, a CPU-time and an address-space limit, and a deadline for
every call: a part that runs past it is stopped and loses its points. When the part ends, the child
and every process it started are killed, a grandchild that left the session included.

The child imports a student build of minilora (student_build.py): the graded assignment's bodies
are holes there, so a submission that calls, copies or execs minilora's own body of a graded
function gets the hole. How far the child is kept from the grader's user, files and processes is
the isolation level (isolation.py), chosen once per grading run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # minilora/
STUDENT_DIR = "student"  # the folder of a release (or a part's private copy) that holds the student's files

CPU_SECONDS = 300  # CPU time of one child (one part)
MEMORY_BYTES = 8 * 1024**3  # address space of one child
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")  # the only ones passed on
NUMERIC_KINDS = "biufc"  # the array dtypes that may cross: bool, integers, floats, complex


class SandboxError(RuntimeError):
    """The child broke the protocol, crashed, or sent something that is not plain data."""


class PartTimeout(Exception):
    """A call into the student's code ran past its deadline (an endless loop, or far too slow)."""


class StudentError(Exception):
    """The student's code raised; the message is its type and first line, as the child reported it."""


class Handle:
    """A value that stays in the child (a cache, a model), named by a number."""

    def __init__(self, number: int):
        self.number = number


def first_line(text: str, limit: int = 300) -> str:
    """The first non-blank line of a message, at most ``limit`` characters: what a score shows of a failure."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0][:limit] if lines else ""


def encode(value):
    """Plain data -> JSON-ready structure; arrays as base64 ``.npy`` bytes; Handle -> its number."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"number": value} if isinstance(value, float) and not np.isfinite(value) else value
    if isinstance(value, np.generic):
        return encode(np.asarray(value))
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in NUMERIC_KINDS:
            raise SandboxError(f"only numeric arrays cross to and from the child, not dtype {value.dtype}")
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        return {"array": base64.b64encode(buffer.getvalue()).decode()}
    if isinstance(value, Handle):
        return {"handle": value.number}
    if isinstance(value, np.random.Generator):
        return {"generator": value.bit_generator.state}
    if type(value) in (tuple, list):
        return {"tuple" if type(value) is tuple else "list": [encode(item) for item in value]}
    if type(value) is dict and all(isinstance(key, str) for key in value):
        return {"dict": {key: encode(item) for key, item in value.items()}}
    raise SandboxError(f"a {type(value).__name__} cannot cross to or from the child")


def decode(data, handle=Handle):
    """The inverse of ``encode``; ``handle(number)`` makes what a handle becomes on this side."""
    if not isinstance(data, dict):
        return data
    ((kind, payload),) = data.items()
    if kind == "number":
        return float(payload)
    if kind == "array":
        return np.load(io.BytesIO(base64.b64decode(payload)), allow_pickle=False)
    if kind == "handle":
        return handle(payload)
    if kind == "generator":
        generator = np.random.default_rng()
        generator.bit_generator.state = payload
        return generator
    if kind in ("tuple", "list"):
        items = [decode(item, handle) for item in payload]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {key: decode(item, handle) for key, item in payload.items()}
    raise SandboxError(f"unknown kind {kind!r} in a message")


class ArgumentModified(AssertionError):
    """The student's function changed an array the grader gave it: the library's callers reuse theirs."""


class StudentProcess:
    """One child holding a submission's student modules; ``process["gelu"]`` is a proxy of student/gelu.py.

    ``submission`` is a folder holding student/, ``build_root`` the folder holding the student build's
    minilora/, ``isolation`` an isolation.Isolation, ``hidden`` the folders a namespace child must see
    empty. ``part_seconds`` is the deadline of the whole part, shared by its calls.
    """

    def __init__(self, submission, build_root, isolation, part_seconds: float = 120.0, hidden=()):
        self.deadline = time.monotonic() + part_seconds
        self.part_seconds = part_seconds
        self.workspace = private_workspace(Path(submission), isolation)
        to_child_read, self._to_child = os.pipe()
        self._from_child, from_child_write = os.pipe()
        plan = {
            "in": to_child_read,
            "out": from_child_write,
            "release": str(self.workspace / "release"),
            "workdir": str(self.workspace / "work"),
            "cpu_seconds": CPU_SECONDS,
            "memory_bytes": MEMORY_BYTES,
        }
        if isolation.level == "namespaces":
            plan["confine"] = {
                "package": [str(Path(build_root) / "minilora"), str(PACKAGE_DIR)],
                "hide": hideable(hidden, build_root, self.workspace),
                "writable": str(self.workspace),
                "reach": interpreter_reach(isolation.uid, isolation.gid),
                "uid": isolation.uid,
                "gid": isolation.gid,
            }
        # -I: no environment variables, no user site, no current directory on the path; -B: no bytecode
        command = [sys.executable, "-I", "-B", "-c", bootstrap(build_root), json.dumps(plan)]
        self._child = subprocess.Popen(
            isolation.wrap(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_child_read, from_child_write),
            env=minimal_environment(self.workspace / "work"),
            cwd=self.workspace / "work",
            start_new_session=True,
            **isolation.popen_arguments(),
        )
        os.close(to_child_read)
        os.close(from_child_write)
        self._buffer = b""

    def __getitem__(self, stem: str):
        return RemoteObject(self, ("module", stem))

    def request(self, message: dict):
        """Send one request; wait for its reply until the part's deadline; the decoded result."""
        os.write(self._to_child, json.dumps(message).encode() + b"\n")
        reply = json.loads(self._read_line())
        if reply.get("kind") == "argument_modified":
            raise ArgumentModified(reply["error"])
        if "error" in reply:
            raise StudentError(reply["error"])
        return decode(reply["result"], handle=lambda number: RemoteObject(self, ("handle", number)))

    def _read_line(self) -> bytes:
        while b"\n" not in self._buffer:
            remaining = self.deadline - time.monotonic()
            ready, _, _ = select.select([self._from_child], [], [], max(remaining, 0))
            if not ready:
                self.close()
                raise PartTimeout(
                    f"the part ran past its limit of {self.part_seconds:.0f} s: is there an endless loop?"
                )
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                code = self._child.wait()
                raise SandboxError(
                    f"the student's process ended during the call (exit code {code}): "
                    "did the code exit, or run out of memory or CPU time?"
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def close(self) -> None:
        """Stop the child and everything it started, and remove the part's folder."""
        if self._child.poll() is None:
            self._child.kill()
            self._child.wait()
        kill_descendants()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.workspace, ignore_errors=True)


def hideable(hidden, *needed) -> list[str]:
    """The folders of ``hidden`` a child can do without: none that holds the interpreter, the build or
    the part's folder (a submission graded from a folder that holds its own virtual environment)."""
    needed = [Path(path).resolve() for path in (*needed, sys.prefix, sys.base_prefix)]
    return [str(path) for path in map(Path, hidden) if not any(want.is_relative_to(path) for want in needed)]


def minimal_environment(home) -> dict:
    """The whole environment a child gets: a path, a locale, its home, and the BLAS thread counts."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": os.fspath(home)}
    env.update({name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ})
    return env


def private_workspace(submission: Path, isolation) -> Path:
    """A fresh folder only the child's user may enter: release/student/ (a copy of the submission's
    files) and work/ (the child's working folder)."""
    workspace = Path(tempfile.mkdtemp(prefix="minilora-part-"))
    student = workspace / "release" / STUDENT_DIR
    student.mkdir(parents=True)
    (workspace / "work").mkdir()
    for path in (submission / STUDENT_DIR).iterdir():
        if path.is_file() and not path.is_symlink():
            shutil.copyfile(path, student / path.name)
    if isolation.uid is not None:
        for path in (workspace, *workspace.rglob("*")):
            os.chown(path, isolation.uid, isolation.gid)
    return workspace


def kill_descendants(spare=frozenset()) -> None:
    """SIGKILL every process below this one but those in ``spare`` (and theirs), and reap the killed.

    The grader is the reaper of orphans (isolation.harden_grader), so a grandchild that called
    ``setsid`` and lost its parent is this process's child again, and is found here (Linux: /proc)."""
    for _ in range(100):
        victims = [pid for pid in descendants(os.getpid(), spare)]
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in victims:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # not this process's child: its own parent reaps it
                pass


def children() -> set[int]:
    """This process's living children now."""
    return set(descendants(os.getpid(), depth=1))


def descendants(root: int, spare=frozenset(), depth: int | None = None) -> list[int]:
    """The living processes below ``root`` (zombies left out), skipping ``spare`` and what is below them."""
    children = {}
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc/self").exists() else ():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, level = [], [root]
    while level and (depth is None or depth > 0):
        level = [child for parent in level for child in children.get(parent, []) if child not in spare]
        found += level
        depth = None if depth is None else depth - 1
    return found


def bootstrap(build_root) -> str:
    """The ``-c`` program of a child: the student build (or, for a probe, this minilora) first on the path."""
    root = os.fspath(build_root) if build_root else os.fspath(PACKAGE_DIR.parent)
    return (
        f"import sys; sys.path.insert(0, {root!r}); "
        "from minilora.assignments.sandbox_child import main; main(sys.argv[1:])"
    )


def probe_command(uid, gid, confined: bool = True) -> list:
    """The command of a child that starts as a part's child would (confined, or not), prints
    'isolated' and ends."""
    plan = {"probe": True}
    if confined:
        plan["confine"] = {"uid": uid, "gid": gid, "reach": interpreter_reach(uid, gid)}
    return [sys.executable, "-I", "-B", "-c", bootstrap(None), json.dumps(plan)]


def interpreter_reach(uid, gid) -> dict:
    """{a folder the user ``uid`` cannot enter: [the interpreter's folders below it]}: what a namespace
    child must make reachable to run this Python (empty for the grader's own user)."""
    if uid is None:
        return {}
    import site

    paths = {sys.base_prefix, sys.prefix, *site.getsitepackages(), str(Path(sys.executable).resolve().parent)}
    outermost = [
        path for path in paths if not any(Path(path).is_relative_to(other) for other in paths - {path})
    ]
    reach = {}
    for path in sorted(outermost):
        blocked = first_closed_folder(Path(path), uid, gid)
        if blocked is not None:
            reach.setdefault(str(blocked), []).append(path)
    return reach


def first_closed_folder(path: Path, uid: int, gid: int):
    """The outermost folder on the way to ``path`` that user ``uid`` (group ``gid``) may not enter, or None."""
    for folder in [*reversed(path.parents), path]:
        info = folder.stat()
        bit = stat.S_IXUSR if info.st_uid == uid else stat.S_IXGRP if info.st_gid == gid else stat.S_IXOTH
        if not info.st_mode & bit:
            return folder
    return None


class RemoteObject:
    """A proxy of something in the child: a student module, or a value held there by handle."""

    def __init__(self, process: StudentProcess, target: tuple):
        self._process, self._target = process, target

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return RemoteAttribute(self._process, self._target, name)

    def __call__(self, *args, **kwargs):
        return self._process.request(_call(self._target, None, args, kwargs))

    def to_wire(self):
        return Handle(self._target[1]) if self._target[0] == "handle" else None


class RemoteAttribute:
    """``remote.name``: called, it calls ``name`` in the child and returns the result."""

    def __init__(self, process: StudentProcess, target: tuple, name: str):
        self._process, self._target, self._name = process, target, name

    def __call__(self, *args, **kwargs):
        return self._process.request(_call(self._target, self._name, args, kwargs))


def _wire(value):
    """Replace proxies of handles by their Handle before encoding."""
    if isinstance(value, RemoteObject):
        handle = value.to_wire()
        if handle is None:
            raise SandboxError("a student module cannot be passed as an argument")
        return handle
    if type(value) in (tuple, list):
        return type(value)(_wire(item) for item in value)
    if type(value) is dict:
        return {key: _wire(item) for key, item in value.items()}
    return value


def _call(target: tuple, name, args, kwargs) -> dict:
    return {
        "op": "call",
        "target": list(target),
        "name": name,
        "args": encode(_wire(tuple(args))),
        "kwargs": encode(_wire(dict(kwargs))),
    }


def counted(remote_function, *args, **kwargs):
    """Call ``remote_function`` in the child inside ``backend.count_matmuls``: (result, product shapes)."""
    process, target, name = remote_function._process, remote_function._target, remote_function._name
    message = _call(target, name, args, kwargs)
    message["op"] = "counted_call"
    return process.request(message)


def mutating(remote_function, *args, **kwargs):
    """Call ``remote_function`` with the argument check off: for a function documented to work in place."""
    process, target, name = remote_function._process, remote_function._target, remote_function._name
    message = _call(target, name, args, kwargs)
    message["may_modify"] = True
    return process.request(message)


def counted_calls(remote_function, names, *args, **kwargs):
    """Call ``remote_function`` counting the calls it makes to the student's functions ``names``:
    ``(result, {name: calls})``.

    The count follows code objects, in the calling thread and in threads started during the call:
    a backward that runs its own forward (numeric differentiation of it) is counted, however it
    names the function. Its limit: a copy of the forward's body under another name is not counted.
    """
    process, target, name = remote_function._process, remote_function._target, remote_function._name
    message = _call(target, name, args, kwargs)
    message["op"] = "count_calls"
    message["count"] = list(names)
    return process.request(message)
