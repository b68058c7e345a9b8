"""The student wheel: minilora with every assignment's holes open, for a course to install on student machines.

An instructor's minilora is the reference solution of every assignment, its graders write the
answers out as their oracles and its planted bugs quote reference lines. A student who installs it
has the answers on disk. The student wheel is built from a copy of the source tree whose package is
``write_student_package(..., every assignment)``: each graded body a ``NotImplementedError``, the
``Derivation (aN):`` blocks gone, no graders, no bugs, no worked solutions. The fast path's twins of
the graded layers (fused NumPy ops, CUDA kernels, fused LoRA and AdamW) are left out too: each one
is a graded body written another way. So the student wheel runs on the reference path only, and
what needs the fast path (``minilora demo``, fused CPU inference, the benchmarks) is not in it. It
carries none of the shipped model and corpora either (setup.py's step, not a student's work), and
its version has the local label ``+student``, so ``pip show minilora`` tells the two builds apart.
Grading does not run in it: that is the course's autograder's or an instructor's install.

``first="a5"`` builds the wheel for the weeks of a5: a5's holes and every later one's open, the
past-due a1-a4 kept as the reference, so that a5's notebook runs on the reference layers (the rule
of a blank release, release.py). The default opens every assignment.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..version import __version__
from .catalog import ASSIGNMENTS
from .gradescope import pip_wheel
from .release import PACKAGE_DIR, opened_by
from .student_build import write_student_package

TREE_FILES = ("pyproject.toml", "README.md", "LICENSE")  # what the build needs beside the package
FAST_TWINS = ("fast/cuda", "fast/cpu/ops.py", "fast/cpu/llama_ops.py")  # graded bodies, written for speed
LOCAL_LABEL = "+student"


def source_tree() -> Path:
    """The source tree this minilora was installed from; a clear error from an installed copy."""
    source = PACKAGE_DIR.parent
    if not (source / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"no pyproject.toml beside {PACKAGE_DIR}: a student wheel is built from minilora's source "
            "tree (a clone installed with `pip install -e .`), not from an installed copy"
        )
    return source


def build_student_wheel(out_dir, first: str | None = None) -> Path:
    """Build the student wheel into ``out_dir`` (offline, no build isolation); its path.

    ``first``: open that assignment's holes and every later one's (default: every assignment's).
    """
    source = source_tree()
    opened = opened_by(first) if first else set(ASSIGNMENTS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="minilora-student-wheel-") as tmp:
        copy = Path(tmp) / "minilora-student"
        copy.mkdir()
        for name in TREE_FILES:
            shutil.copy2(source / name, copy / name)
        write_student_package(copy, opened)
        strip_fast_twins(copy / "minilora")
        pip_wheel(copy, out_dir, "the student wheel")
    (wheel,) = out_dir.glob(f"minilora-{__version__}{LOCAL_LABEL}-*.whl")
    return wheel


def strip_fast_twins(package: Path) -> None:
    """Leave the fast path's twins of the graded layers out, and label the version ``+student``."""
    for relative in FAST_TWINS:
        path = package / relative
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    version = package / "version.py"
    text = version.read_text()
    labelled = text.replace(f'__version__ = "{__version__}"', f'__version__ = "{__version__}{LOCAL_LABEL}"')
    if labelled == text:
        raise RuntimeError(f"cannot label the student build's version: no __version__ line in {version}")
    version.write_text(labelled)
