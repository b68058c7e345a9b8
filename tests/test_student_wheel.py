"""The student wheel: minilora as a course installs it on student machines, with no answer on the disk.

Built once per module from this source tree; then read as a zip (no graded body, no derivation, no
grader, bug or solution in any file) and installed into a fresh virtual environment (it imports, and
a hole raises NotImplementedError)."""

import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from minilora.assignments.release import BEGIN, END, PACKAGE_DIR
from minilora.assignments.student_wheel import build_student_wheel

# Lines of a hole that say nothing about its answer: plain control flow the reference repeats
# elsewhere outside any hole (a bias test, a loop over the blocks).
GENERIC = {"if b is not None:", "for i in reversed(range(self.config.n_layer)):"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_student_wheel(tmp_path_factory.mktemp("student-wheel"))


@pytest.fixture(scope="module")
def files(wheel) -> dict:
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name).decode("utf-8", errors="replace") for name in archive.namelist()}


def hole_lines() -> dict:
    """{code line: the file of the hole} for every non-trivial line of every hole of the source tree."""
    lines = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        inside = False
        for line in path.read_text().split("\n"):
            if BEGIN.match(line) or END.match(line):
                inside = bool(BEGIN.match(line))
                continue
            code = line.split("  #")[0].strip()
            trivial = len(code) < 15 or not re.search(r"\w", code) or re.match(r"(return|pass)\b", code)
            if inside and not trivial and not code.startswith("#") and code not in GENERIC:
                lines[code] = path.relative_to(PACKAGE_DIR).as_posix()
    return lines


def test_no_graded_body_derivation_grader_bug_or_solution_is_in_the_student_wheel(files):
    lines = hole_lines()
    assert len(lines) > 100, "the source tree's holes were not found"
    survivors = {code: [name for name, text in files.items() if code in text] for code in lines}
    assert {code: where for code, where in survivors.items() if where} == {}
    assert [name for name, text in files.items() if re.search(r"Derivation \(a\d+\):", text)] == []
    instructor_only = re.compile(r"/(graders|bugs)/|planted_bugs\.py$|solutions", re.IGNORECASE)
    assert [name for name in files if instructor_only.search(name)] == []
    assert "minilora/STUDENT_BUILD" in files and "minilora/assignments/handouts/a1.md" in files


def test_the_student_wheel_installs_imports_and_its_holes_raise(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    target = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target"]
    subprocess.run([*install, target, str(wheel)], check=True)
    # minilora's dependencies (NumPy, ...) from this environment, without its editable minilora
    (Path(target) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = (
        "import numpy as np, minilora, minilora.layers, minilora.lora\n"
        "from minilora.assignments.student_build import is_student_build\n"
        f"assert minilora.__file__.startswith({target!r}), minilora.__file__\n"
        "assert is_student_build() and minilora.__version__.endswith('+student')\n"
        "try:\n    minilora.layers.gelu_forward(np.zeros(3))\n"
        "except NotImplementedError as err:\n    print('hole:', err)\n"
    )
    done = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("hole: a1: "), done.stdout
