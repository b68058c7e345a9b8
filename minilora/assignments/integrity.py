"""The graders' fingerprints: grading refuses to start, or to count, when a trusted file changed.

``graders/SHA256SUMS`` lists the SHA-256 of every file the grading trusts (the graders, the grading
and sandbox modules, the gradient checker), relative to the minilora package, in ``sha256sum``'s
format: ``cd <minilora package> && sha256sum -c assignments/graders/SHA256SUMS`` checks an install by
hand. Grading checks it before every submission and again after it, so a submission that edits an
installed grader (a same-user child can, see isolation.py) is refused on the spot and on every later
run. A developer who changes one of these files writes the sums again:
``python -m minilora.assignments.integrity --write``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from .isolation import RefusedToGrade
from .sandbox import PACKAGE_DIR

SUMS = PACKAGE_DIR / "assignments" / "graders" / "SHA256SUMS"
TRUSTED = (  # globs, relative to the package
    "assignments/graders/*.py",
    "assignments/catalog.py",
    "assignments/grading.py",
    "assignments/integrity.py",
    "assignments/isolation.py",
    "assignments/release.py",
    "assignments/sandbox.py",
    "assignments/sandbox_child.py",
    "assignments/student_build.py",
    "assignments/train_tiny.py",
    "gradcheck.py",
)


def trusted_files() -> list[Path]:
    return sorted(path for pattern in TRUSTED for path in PACKAGE_DIR.glob(pattern))


def current_sums() -> dict:
    """{path relative to the package: SHA-256} of the trusted files as they are now."""
    return {path.relative_to(PACKAGE_DIR).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in trusted_files()}  # fmt: skip


def recorded_sums() -> dict:
    if not SUMS.is_file():
        raise RefusedToGrade(
            f"refusing to grade: {SUMS.name} is missing from the graders; reinstall minilora"
        )
    pairs = (line.split(maxsplit=1) for line in SUMS.read_text().splitlines() if line.strip())
    return {name.strip(): digest for digest, name in pairs}


def check_graders(when: str = "") -> None:
    """Raise RefusedToGrade naming the first trusted file whose contents differ from the record."""
    recorded, current = recorded_sums(), current_sums()
    for name in sorted(set(recorded) | set(current)):
        if recorded.get(name) != current.get(name):
            change = "is new" if name not in recorded else "is gone" if name not in current else "changed"
            raise RefusedToGrade(
                f"refusing to grade: the grader file {name} {change}{' ' + when if when else ''} "
                "(reinstall minilora; a developer who changed it runs "
                "`python -m minilora.assignments.integrity --write`)"
            )


def write_sums() -> Path:
    SUMS.write_text("".join(f"{digest}  {name}\n" for name, digest in current_sums().items()))
    return SUMS


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m minilora.assignments.integrity --write")
    print(f"wrote {write_sums()}")
