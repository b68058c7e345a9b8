"""The child side of sandbox.py: confines itself, imports a release's student modules, answers calls.

Started as ``python -I -B -c BOOTSTRAP PLAN`` (BOOTSTRAP puts the student build first on the path;
PLAN is JSON: the pipe descriptors, the release folder, the working folder, the limits, and for the
``namespaces`` level the confinement). It reads one JSON request per line from one pipe and writes
one JSON reply per line to the other. Its standard output and error go nowhere, so nothing the
student's code prints reaches the grader.

Two checks run around every call. An array the grader sent must come back unchanged unless the
grader called the function through ``sandbox.mutating`` (the library's callers reuse their
arrays, so a layer that edits its input breaks them). And ``counted_calls`` counts the calls made
to given functions of the student's modules (by code object, in every thread), so a grader can
bound how often a backward runs its own forward.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading

import numpy as np

from ..backend import count_matmuls
from .release import StudentImportError, StudentModules
from .sandbox import NUMERIC_KINDS, Handle, decode, encode, first_line

MS_NOSUID, MS_BIND, MS_REC, MS_PRIVATE = 2, 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = (
    428,
    429,
    442,
)  # the same numbers on every Linux architecture
AT_FDCWD, AT_RECURSIVE, OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH = -100, 0x8000, 1, 0x4
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, LAST_CAPABILITY = 24, 38, 63
CHILD_PROCESSES = 256  # RLIMIT_NPROC of a sandbox user: a fork bomb stops there


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


def _checked(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def confine(plan: dict) -> None:
    """The ``namespaces`` level, run as the namespace's root before any student code: make reachable
    the interpreter's folders the sandbox user could not enter, hide, make the file system read-only
    but the part's folder, then become the sandbox user or drop every capability."""
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source, target, fstype, flags, data=None):
        encoded = [None if s is None else os.fsencode(s) for s in (source, target, fstype, data)]
        _checked(libc.mount(encoded[0], encoded[1], encoded[2], flags, encoded[3]), f"mount {target}")

    def set_attributes(path, attr_set=0, attr_clr=0, flags=0):
        attr = MountAttr(attr_set, attr_clr, 0, 0)
        result = libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, os.fsencode(path), flags, ctypes.byref(attr),
                              ctypes.sizeof(attr))  # fmt: skip
        _checked(result, f"mount_setattr {path}")

    mount(None, "/", None, MS_REC | MS_PRIVATE)
    for blocked, paths in plan.get("reach", {}).items():  # e.g. a Python under a home only root may enter
        clones = [
            libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(p), OPEN_TREE_CLONE | AT_RECURSIVE)
            for p in paths
        ]
        if min(clones) < 0:
            _checked(-1, f"open_tree under {blocked}")
        mount("tmpfs", blocked, "tmpfs", MS_NOSUID, "size=64k,mode=0755")
        for path, clone in zip(paths, clones):
            os.makedirs(path, exist_ok=True)
            moved = libc.syscall(
                SYS_MOVE_MOUNT, clone, b"", AT_FDCWD, os.fsencode(path), MOVE_MOUNT_F_EMPTY_PATH
            )
            _checked(moved, f"move_mount {path}")
    if plan.get("package"):
        build, real = plan["package"]
        mount(build, real, None, MS_BIND | MS_REC)
    for path in plan.get("hide", []):
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_NOSUID, "size=64k,mode=0555")
    writable = plan.get("writable")
    if writable:
        mount(writable, writable, None, MS_BIND)
    set_attributes("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, flags=AT_RECURSIVE)
    if writable:
        set_attributes(writable, attr_clr=MOUNT_ATTR_RDONLY)
    drop_privileges(libc, plan.get("uid"), plan.get("gid"))


def drop_privileges(libc, uid, gid) -> None:
    """Become ``uid`` (root grading), or stay the user namespace's root with no capability at all."""
    if uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        import resource

        resource.setrlimit(resource.RLIMIT_NPROC, (CHILD_PROCESSES, CHILD_PROCESSES))
    else:
        for capability in range(LAST_CAPABILITY + 1):
            libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)  # no exec can get one back
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        _checked(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    _checked(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def limit_resources(cpu_seconds: int, memory_bytes: int) -> None:
    """CPU time and address space of this process (POSIX only; elsewhere the per-call deadline remains)."""
    try:
        import resource
    except ImportError:
        return
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def arrays_in(value):
    """Every numpy array inside a structure of plain data."""
    if isinstance(value, np.ndarray):
        yield value
    elif type(value) in (tuple, list):
        for item in value:
            yield from arrays_in(item)
    elif type(value) is dict:
        for item in value.values():
            yield from arrays_in(item)


class ArgumentModified(Exception):
    """The student's function changed an array it was given (the grader sees an ArgumentModified)."""


class CallCounter:
    """A profile hook counting calls of some code objects, in this thread and in threads it starts."""

    def __init__(self, codes: dict):
        self.codes, self.counts = codes, dict.fromkeys(codes.values(), 0)

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code in self.codes:
            self.counts[self.codes[frame.f_code]] += 1


class Dispatcher:
    """Runs requests against the student modules and the values held by handle."""

    def __init__(self, release_dir):
        self.modules = StudentModules(release_dir)
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

    def code_objects(self, names) -> dict:
        """{code object: name} of the loaded student modules' functions of these names."""
        codes = {}
        for module in self.modules.loaded():
            for name in names:
                function = getattr(module, name, None)
                if hasattr(function, "__code__"):
                    codes[function.__code__] = name
        return codes

    def run(self, message: dict):
        obj = self.target(message["target"])
        function = obj if message["name"] is None else getattr(obj, message["name"])
        sent_args, sent_kwargs = decode(message["args"]), decode(message["kwargs"])
        sent = list(arrays_in((sent_args, sent_kwargs)))
        before = [array.copy() for array in sent]
        args, kwargs = self.resolve(sent_args), self.resolve(sent_kwargs)
        op = message["op"]
        if op == "counted_call":
            with count_matmuls() as log:
                result = function(*args, **kwargs)
            result = (result, [list(map(list, product)) for product in log.products])
        elif op == "count_calls":
            result = self.count_calls(function, message["count"], args, kwargs)
        else:
            result = function(*args, **kwargs)
        if not message.get("may_modify"):
            for number, (array, original) in enumerate(zip(sent, before)):
                if array.shape != original.shape or not np.array_equal(array, original, equal_nan=True):
                    raise ArgumentModified(
                        f"the function changed array argument {number} (shape {original.shape}) it was "
                        "given: work on a copy, the library's callers reuse their arrays"
                    )
        return self.keep(result)

    def count_calls(self, function, names, args, kwargs):
        """``(result, {name: calls})``: the calls made to the named student functions during the call."""
        counter = CallCounter(self.code_objects(names))
        threading.setprofile(counter)
        sys.setprofile(counter)
        try:
            result = function(*args, **kwargs)
        finally:
            switched_off = sys.getprofile() is not counter
            sys.setprofile(None)
            threading.setprofile(None)
        if switched_off:
            raise PermissionError("the submission switched off the call counter")
        return result, counter.counts


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``, as the grader's table shows it."""
    return f"{type(err).__name__}: {first_line(str(err))}".rstrip(": ")


def serve(plan: dict) -> None:
    """Answer requests until the grader closes the pipe."""
    dispatcher = Dispatcher(plan["release"])
    requests, replies = os.fdopen(plan["in"], "rb"), os.fdopen(plan["out"], "wb", buffering=0)
    for line in requests:
        try:
            reply = {"result": encode(dispatcher.run(json.loads(line)))}
        except StudentImportError as err:
            reply = {"error": str(err)}
        except ArgumentModified as err:
            reply = {"error": str(err), "kind": "argument_modified"}
        except BaseException as err:  # whatever the student's code raises is the part's failure
            reply = {"error": error_line(err)}
        replies.write(json.dumps(reply).encode() + b"\n")


def main(argv) -> None:
    plan = json.loads(argv[0])
    if plan.get("confine"):
        confine(plan["confine"])
    if plan.get("probe"):
        print("isolated", flush=True)
        return
    limit_resources(plan["cpu_seconds"], plan["memory_bytes"])
    os.chdir(plan["workdir"])
    serve(plan)
