"""The child side of sandbox.py: imports a release's student modules and answers the grader's calls.

Started as ``python -I -m minilora.assignments.sandbox_child IN OUT RELEASE GUARDED CPU MEMORY``: it
reads one JSON request per line from file descriptor IN and writes one JSON reply per line to OUT.
Its standard output and error go nowhere, so nothing the student's code prints reaches the grader.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..backend import count_matmuls
from .release import StudentImportError, StudentModules
from .sandbox import NUMERIC_KINDS, Handle, decode, encode, first_line

PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)  # the installed minilora/


def limit_resources(cpu_seconds: int, memory_bytes: int) -> None:
    """CPU time and address space of this process (POSIX only; elsewhere the per-call deadline remains)."""
    try:
        import resource
    except ImportError:
        return
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


class ReferenceGuard:
    """Notes any call, while armed, to a function of minilora's own whose name the assignment asks for.

    A profile hook cannot safely raise (Python removes a hook that raises), so it only records; the
    dispatcher turns a record into a refusal of the whole call.
    """

    def __init__(self, names):
        self.names = frozenset(names)
        self.violation = None

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_name in self.names and code.co_filename.startswith(PACKAGE_DIR):
            self.violation = self.violation or f"{Path(code.co_filename).name}:{code.co_name}"


class Dispatcher:
    """Runs requests against the student modules and the values held by handle."""

    def __init__(self, release_dir, guard: ReferenceGuard):
        self.modules = StudentModules(release_dir)
        self.guard = guard
        self.held = []  # values kept in this process, by handle number

    def keep(self, value):
        """A result as plain data, with everything else held here and sent as a handle."""
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in NUMERIC_KINDS:
            return value
        if type(value) in (tuple, list):
            return type(value)(self.keep(item) for item in value)
        if type(value) is dict and all(isinstance(key, str) for key in value):
            return {key: self.keep(item) for key, item in value.items()}
        self.held.append(value)
        return Handle(len(self.held) - 1)

    def resolve(self, value):
        if isinstance(value, Handle):
            return self.held[value.number]
        if type(value) in (tuple, list):
            return type(value)(self.resolve(item) for item in value)
        if type(value) is dict:
            return {key: self.resolve(item) for key, item in value.items()}
        return value

    def target(self, target):
        kind, key = target
        return self.modules[key] if kind == "module" else self.held[key]

    def run(self, message: dict):
        obj = self.target(message["target"])
        if message["op"] == "get":
            return self.keep(getattr(obj, message["name"]))
        function = obj if message["name"] is None else getattr(obj, message["name"])
        args = self.resolve(decode(message["args"]))
        kwargs = self.resolve(decode(message["kwargs"]))
        self.guard.violation = None
        sys.setprofile(self.guard)
        try:
            if message["op"] == "counted_call":
                with count_matmuls() as log:
                    result = function(*args, **kwargs)
                result = (result, [list(map(list, product)) for product in log.products])
            else:
                result = function(*args, **kwargs)
        finally:
            sys.setprofile(None)
        if self.guard.violation:
            raise PermissionError(
                f"the submission called minilora's own {self.guard.violation}: write the function yourself"
            )
        return self.keep(result)


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``, as the grader's table shows it."""
    return f"{type(err).__name__}: {first_line(str(err))}".rstrip(": ")


def main(argv) -> None:
    read_fd, write_fd, release_dir, guarded, cpu_seconds, memory_bytes = argv
    limit_resources(int(cpu_seconds), int(memory_bytes))
    release_dir = str(Path(release_dir).resolve())
    os.chdir(tempfile.mkdtemp(prefix="minilora-part-"))  # a fresh working directory for the part
    dispatcher = Dispatcher(release_dir, ReferenceGuard(json.loads(guarded)))
    requests, replies = os.fdopen(int(read_fd), "rb"), os.fdopen(int(write_fd), "wb", buffering=0)
    for line in requests:
        try:
            reply = {"result": encode(dispatcher.run(json.loads(line)))}
        except StudentImportError as err:
            reply = {"error": str(err)}
        except BaseException as err:  # whatever the student's code raises is the part's failure
            reply = {"error": error_line(err)}
        replies.write(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    main(sys.argv[1:])
