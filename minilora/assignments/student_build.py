"""A student build of minilora: the whole package with the holes of some assignments open.

In a student build, each hole of the chosen assignments is ``raise NotImplementedError("aN: hint")``
and their ``Derivation (aN):`` blocks are gone, in every file of the package; the files only an
instructor needs are left out: the graders (they write the answers out as their oracles), the planted
bugs (their context lines are reference code) and the worked solutions.

Two users: the grader's child process imports a build with the graded assignment's holes open, so a
submission that calls, copies or execs minilora's own body of a graded function finds only the hole;
and a course installs on student machines a wheel built from a build with every hole open
(student_wheel.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .release import BEGIN, DERIVATION, PACKAGE_DIR, student_copy

# Names left out of every student build: planted_bugs.py quotes reference lines as its patches' targets.
# (The worked solutions are no package data at all: docs/assignments/solutions/ of the source tree.)
INSTRUCTOR_ONLY = ("graders", "bugs", "planted_bugs.py", "*_solutions.md")
BUILD_RECORD = "STUDENT_BUILD"  # a file at the build's package root naming the opened assignments


def opens_in(source: str, assignment_ids: set) -> bool:
    """Whether a file's text holds a hole or a derivation of one of these assignments."""
    marks = (BEGIN.match(line) or DERIVATION.match(line) for line in source.split("\n"))
    return any(mark and mark.group(2) in assignment_ids for mark in marks)


def write_student_package(dest, assignment_ids, leave_out=()) -> Path:
    """Write ``dest/minilora``, a student build with the holes of ``assignment_ids`` open; ``dest``.

    ``leave_out`` names more files or folders to leave out (glob patterns, as INSTRUCTOR_ONLY's)."""
    opened = set(assignment_ids)
    dest = Path(dest)
    package = dest / "minilora"
    ignored = shutil.ignore_patterns("__pycache__", "*.pyc", *INSTRUCTOR_ONLY, *leave_out)
    shutil.copytree(PACKAGE_DIR, package, ignore=ignored)
    for path in package.rglob("*.py"):
        source = path.read_text()
        if opens_in(source, opened):
            dotted = ".".join(["minilora", *path.parent.relative_to(package).parts])
            path.write_text(student_copy(source, opened, dotted))
    (package / BUILD_RECORD).write_text(" ".join(sorted(opened)) + "\n")
    return dest


def is_student_build() -> bool:
    """Whether the minilora running this is a student build (it has no graders)."""
    return (PACKAGE_DIR / BUILD_RECORD).is_file()
