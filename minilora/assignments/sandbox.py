"""Running a student's code in a child process that the grader talks to, so grading cannot be steered.

The grader (a pytest file, trusted) runs in one process; the student's modules are imported only in
a child process, one fresh child per graded part. The grader reaches them through proxies:
``student["gelu"].gelu_forward(x)`` sends the call to the child, which runs it and sends the result
back. Plain data crosses the boundary by value (NumPy arrays of numbers, Python numbers, strings,
None, and tuples, lists and dicts of them); anything else (a cache, a model) stays in the child and
comes back as a handle, which the grader can pass to later calls or call methods on.

Why: the child can do anything a Python program can, but only in the child. It cannot reach the
grader's checks, its scores or its score file, and whatever it prints is discarded. The parent
reads the child's replies as JSON and NumPy's ``.npy`` bytes with pickling refused, so a reply can
carry numbers, never code. The child runs in a fresh temporary working directory, under a CPU-time
and an address-space limit (``resource``, on POSIX), and every call has a deadline: a part that runs
past it is stopped and loses its points.

The child refuses to let the student's code call the reference implementation of the functions the
assignment asks for (any function of that name defined inside the installed minilora package): such
a call makes the part fail with a message. What a local grader cannot prevent: the library is
installed, so a student can copy a reference body into their own file, and code in the child can
switch the child's own guard off. The numbers are still checked in the parent, so what a submission
cannot do is score without producing the right numbers itself for inputs drawn anew in each run.

Where the grader runs as root (a Gradescope container), ``MINILORA_SANDBOX_USER`` names an
unprivileged user for the children: the student's code then cannot write the results, the installed
library or anything else the grader owns (gradescope.py sets it; see docs/instructors.md).
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LIBRARY_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds this minilora package
CPU_SECONDS = 300  # CPU time of one child (one part)
MEMORY_BYTES = 8 * 1024**3  # address space of one child
NUMERIC_KINDS = "biufc"  # the array dtypes that may cross: bool, integers, floats, complex
SANDBOX_USER_ENV_VAR = "MINILORA_SANDBOX_USER"  # if set, the children run as this user (needs root)


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


class StudentProcess:
    """One child holding a release's student modules; ``process["gelu"]`` is a proxy of student/gelu.py.

    ``guarded`` names the functions the assignment asks for: the child refuses calls to minilora's
    own functions of those names. ``part_seconds`` is the deadline of the whole part, shared by its calls.
    """

    def __init__(self, release_dir, guarded=(), part_seconds: float = 120.0):
        self.deadline = time.monotonic() + part_seconds
        self.part_seconds = part_seconds
        to_child_read, self._to_child = os.pipe()
        self._from_child, from_child_write = os.pipe()
        # -I: no environment variables, no user site, no current directory on the path; the path to this
        # very minilora is given explicitly, so the child runs the grader's own library.
        bootstrap = (
            f"import sys; sys.path.insert(0, {str(LIBRARY_ROOT)!r}); "
            "from minilora.assignments.sandbox_child import main; main(sys.argv[1:])"
        )
        command = [
            sys.executable,
            "-I",
            "-c",
            bootstrap,
            str(to_child_read),
            str(from_child_write),
            os.fspath(release_dir),
            json.dumps(list(guarded)),
            str(CPU_SECONDS),
            str(MEMORY_BYTES),
        ]
        self._child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_child_read, from_child_write),
            **unprivileged_user(),
        )
        os.close(to_child_read)
        os.close(from_child_write)
        self._buffer = b""

    def __getitem__(self, stem: str):
        return RemoteObject(self, ("module", stem))

    def request(self, message: dict):
        """Send one request; wait for its reply until the part's deadline; the decoded result."""
        os.write(self._to_child, json.dumps(message).encode() + b"\n")
        line = self._read_line()
        reply = json.loads(line)
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
        """Stop the child (and anything it is running)."""
        if self._child.poll() is None:
            self._child.kill()
            self._child.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass


def unprivileged_user() -> dict:
    """``Popen`` arguments that run a child as the user ``MINILORA_SANDBOX_USER`` names, if it is set."""
    name = os.environ.get(SANDBOX_USER_ENV_VAR)
    if not name:
        return {}
    import pwd

    record = pwd.getpwnam(name)
    return {"user": record.pw_uid, "group": record.pw_gid, "extra_groups": []}


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
