"""An assignment as a Gradescope autograder: ``minilora assignment export aN --gradescope --out aN.zip``.

Gradescope builds a container image from the zip once (running ``setup.sh`` as root, with the zip's
contents in /autograder/source), then for every submission copies the student's files to
/autograder/submission, runs /autograder/run_autograder and shows /autograder/results/results.json.
The zip holds:

- ``setup.sh``: installs Python, a virtual environment at /autograder/venv, and the minilora wheel
  beside it (built from this very source tree at export time, so the image grades with exactly the
  graders, holes and references the class was given; Gradescope's image cannot reach this repo), and
  creates the unprivileged user the student's code runs as;
- ``run_autograder``: runs ``python -m minilora.assignments.gradescope``, this module, on the root;
- ``autograder.json``: which assignment, which files, which minilora version;
- ``minilora-<version>-py3-none-any.whl``.

The runner looks for each of the assignment's files in the submission (at its top or in any folder,
e.g. an uploaded ``student/``), copies only those into a fresh release folder, and grades it with
``grading.grade``: the same pytest grader in its own process, the same child process per part. Files
of other names are ignored. ``MINILORA_AUTOGRADER_ROOT`` replaces /autograder (a test runs the
autograder in a temporary folder) and ``MINILORA_AUTOGRADER_PYTHON`` the venv's Python.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ..version import __version__
from .catalog import get_assignment
from .grading import grade
from .handout import part_title
from .release import PACKAGE_DIR, STUDENT_DIR
from .sandbox import SANDBOX_USER_ENV_VAR

ROOT_ENV_VAR = "MINILORA_AUTOGRADER_ROOT"
PYTHON_ENV_VAR = "MINILORA_AUTOGRADER_PYTHON"
DEFAULT_ROOT = "/autograder"
CONFIG_NAME = "autograder.json"
SANDBOX_USER = "minilora-student"  # setup.sh creates it; the student's code runs as this user

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image (docs/instructors.md).
# It installs Python, a virtual environment and the minilora wheel that sits beside this script,
# and creates the unprivileged user that the student's code runs as.
set -euo pipefail
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${MINILORA_AUTOGRADER_ROOT:-/autograder}"
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip
python3 -m venv "$ROOT/venv"
"$ROOT/venv/bin/pip" install --upgrade pip
"$ROOT/venv/bin/pip" install "$SOURCE"/minilora-*.whl "pytest>=8"
id -u {user} >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin {user}
""".replace("{user}", SANDBOX_USER)

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission: it grades /autograder/submission with minilora's grader
# and writes /autograder/results/results.json. MINILORA_AUTOGRADER_ROOT replaces /autograder and
# MINILORA_AUTOGRADER_PYTHON the Python of setup.sh's virtual environment.
set -euo pipefail
ROOT="${MINILORA_AUTOGRADER_ROOT:-/autograder}"
PYTHON="${MINILORA_AUTOGRADER_PYTHON:-$ROOT/venv/bin/python}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
cd "$ROOT"  # Gradescope's working directory; python -m puts it first on the path
exec "$PYTHON" -m minilora.assignments.gradescope "$ROOT"
"""


def build_wheel(out_dir) -> Path:
    """A wheel of this minilora, built offline from a clean copy of its source tree; its path."""
    source = PACKAGE_DIR.parent
    if not (source / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"no pyproject.toml beside {PACKAGE_DIR}: exporting builds a wheel of minilora, which needs its "
            "source tree (a clone installed with `pip install -e .`), not an installed copy"
        )
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="minilora-wheel-") as tmp:
        copy = Path(tmp) / "minilora-source"
        copy.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(source / name, copy / name)
        shutil.copytree(PACKAGE_DIR, copy / "minilora", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        command = [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
            "--quiet", "--wheel-dir", str(out_dir), str(copy),
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"building minilora's wheel failed:\n{completed.stdout}\n{completed.stderr}")
    (wheel,) = out_dir.glob(f"minilora-{__version__}-*.whl")
    return wheel


def _add(archive: zipfile.ZipFile, name: str, data: bytes, executable: bool = False) -> None:
    info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (0o100755 if executable else 0o100644) << 16  # a regular file and its mode
    archive.writestr(info, data)


def export_gradescope(assignment_id: str, out) -> Path:
    """Write the Gradescope autograder zip of one assignment to ``out``; its path."""
    assignment = get_assignment(assignment_id)
    out = Path(out)
    config = {
        "assignment": assignment_id,
        "title": assignment.title,
        "files": [Path(relative).name for relative in assignment.sources],
        "minilora_version": __version__,
    }
    with tempfile.TemporaryDirectory(prefix="minilora-export-") as tmp:
        wheel = build_wheel(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w") as archive:
            _add(archive, "setup.sh", SETUP_SH.encode(), executable=True)
            _add(archive, "run_autograder", RUN_AUTOGRADER.encode(), executable=True)
            _add(archive, CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
            _add(archive, wheel.name, wheel.read_bytes())
    return out


def gather(submission: Path, files, student: Path) -> tuple[list, list]:
    """Copy each expected file from the submission into ``student``: (the paths found, the names missing).

    A file is taken from the shallowest folder that has it (the submission's top, or e.g. student/);
    nothing else of the submission is copied.
    """
    student.mkdir(parents=True, exist_ok=True)
    found, missing = [], []
    for name in files:
        candidates = [
            path
            for path in submission.rglob(name)
            if path.is_file() and not path.is_symlink() and "__MACOSX" not in path.parts
        ]
        if not candidates:
            missing.append(name)
            continue
        chosen = min(candidates, key=lambda path: (len(path.relative_to(submission).parts), str(path)))
        shutil.copyfile(chosen, student / name)
        found.append(str(chosen.relative_to(submission)))
    return found, missing


def sandbox_user() -> str | None:
    """The user the student's code runs as: MINILORA_SANDBOX_USER, else setup.sh's user when root."""
    if os.environ.get(SANDBOX_USER_ENV_VAR):
        return os.environ[SANDBOX_USER_ENV_VAR]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            pwd.getpwnam(SANDBOX_USER)
            return SANDBOX_USER
        except KeyError:
            return None
    return None


def results_document(score, found: list, missing: list) -> dict:
    """Gradescope's results.json: one test per graded part, the total, a note for the student, and in
    extra_data (kept for the instructor) the seed and the minilora that graded."""
    tests = []
    for part in score.parts:
        failure = f"{part['error']}: {part.get('message', '')}".rstrip(": ") if part["error"] else ""
        tests.append(
            {
                "name": part_title(part["name"]),
                "score": part["earned"],
                "max_score": part["points"],
                "status": "passed" if part["earned"] == part["points"] else "failed",
                "output": failure or "passed",
            }
        )
    lines = [
        f"{score.assignment}: {score.earned}/{score.total} (minilora {__version__}).",
        f"Graded: {', '.join(found) or 'nothing'}." + (f" Missing: {', '.join(missing)}." if missing else ""),
        f"Inputs drawn with seed {score.seed}: `minilora assignment grade {score.assignment} --seed "
        f"{score.seed}` draws them again.",
    ]
    extra = {"seed": score.seed, "minilora_version": __version__, "minilora": str(PACKAGE_DIR)}
    return {"score": score.earned, "output": "\n".join(lines), "tests": tests, "extra_data": extra}


def run(root) -> dict:
    """Grade root/submission for the assignment in root/source/autograder.json; write root/results/results.json."""
    root = Path(root)
    started = time.monotonic()
    config = json.loads((root / "source" / CONFIG_NAME).read_text())
    results_dir = root / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="minilora-submission-") as tmp:
        release_dir = Path(tmp)
        found, missing = gather(root / "submission", config["files"], release_dir / STUDENT_DIR)
        user = sandbox_user()
        if user:  # the children run as this user: they must read the copies, and nothing else of ours
            os.environ[SANDBOX_USER_ENV_VAR] = user
            for path in (release_dir, release_dir / STUDENT_DIR):
                path.chmod(0o755)
        try:
            document = results_document(grade(config["assignment"], release_dir), found, missing)
        except Exception as err:  # the grader itself failed: say so to the student, score nothing
            document = {
                "score": 0,
                "output": f"the autograder could not grade this submission: {type(err).__name__}: {err}",
                "tests": [],
            }
    document["execution_time"] = round(time.monotonic() - started, 1)
    (results_dir / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    return document


def main(argv) -> None:
    root = argv[0] if argv else os.environ.get(ROOT_ENV_VAR, DEFAULT_ROOT)
    document = run(root)
    print(document["output"])
    for test in document["tests"]:
        print(f"{test['name']:<70} {test['score']}/{test['max_score']}")


if __name__ == "__main__":
    main(sys.argv[1:])
