"""An assignment as a Gradescope autograder: ``minilora assignment export aN --gradescope --out aN.zip``.

Gradescope builds a container image from the zip once (running ``setup.sh`` as root, with the zip's
contents in /autograder/source), then for every submission copies the student's files to
/autograder/submission, runs /autograder/run_autograder and shows /autograder/results/results.json.
The zip holds:

- ``setup.sh``: installs Python, a virtual environment at /autograder/venv, the minilora wheel
  beside it (built from this very source tree at export time, so the image grades with exactly the
  graders, holes and references the class was given; Gradescope's image cannot reach this repo) and
  the pinned dependencies of requirements.txt; creates the unprivileged user the student's code runs
  as, and closes the installed minilora and the zip's folder to that user;
- ``run_autograder``: runs ``python -m minilora.assignments.gradescope``, this module, on the root;
- ``requirements.txt``: what minilora and pytest need, at the versions the export ran with;
- ``autograder.json``: which assignment, which files, which minilora version and commit, and the
  run's time budget (under Gradescope's default timeout of 10 minutes);
- ``minilora-<version>-py3-none-any.whl``.

The runner reads the assignment's files from the submission by the same rule as local grading
(``grading.collect``: at its top or in any folder, e.g. an uploaded ``student/``) and grades them
with ``grading.grade_submission``: the same pytest grader in its own process, the same child
process per part, the same isolation levels. Files of other names are ignored; as root with no
sandbox user, nothing is graded and results.json says why. ``MINILORA_AUTOGRADER_ROOT`` replaces
/autograder (a test runs the autograder in a temporary folder) and ``MINILORA_AUTOGRADER_PYTHON`` the venv's Python.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ..version import __version__
from .catalog import get_assignment
from .grading import NotGraded, collect, grade_submission
from .handout import part_title
from .isolation import DEFAULT_SANDBOX_USER, RefusedToGrade, choose_isolation
from .sandbox import PACKAGE_DIR

ROOT_ENV_VAR = "MINILORA_AUTOGRADER_ROOT"
PYTHON_ENV_VAR = "MINILORA_AUTOGRADER_PYTHON"
DEFAULT_ROOT = "/autograder"
CONFIG_NAME = "autograder.json"
SANDBOX_USER = DEFAULT_SANDBOX_USER  # setup.sh creates it; the student's code runs as this user
TIME_BUDGET_SECONDS = 480  # the whole run, under Gradescope's default timeout of 10 minutes
PINNED = (
    "minilora",
    "pytest",
)  # what they need is installed at the versions of the export (minilora: its wheel)

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image (docs/instructors.md).
# It installs Python, a virtual environment, the minilora wheel that sits beside this script and the
# exact versions of its dependencies that the export ran with (requirements.txt), creates the
# unprivileged user that the student's code runs as, and closes the installed minilora (graders,
# references) and this source folder to that user: its code imports a student build instead.
set -euo pipefail
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${MINILORA_AUTOGRADER_ROOT:-/autograder}"
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip
python3 -m venv "$ROOT/venv"
"$ROOT/venv/bin/pip" install --no-deps -r "$SOURCE/requirements.txt" "$SOURCE"/minilora-*.whl
id -u {user} >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin {user}
chmod -R o-rwx "$("$ROOT/venv/bin/python" -c 'import minilora, os; print(os.path.dirname(minilora.__file__))')"
chmod -R o-rwx "$SOURCE"
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
        pip_wheel(copy, out_dir, "minilora's wheel")
    (wheel,) = out_dir.glob(f"minilora-{__version__}-*.whl")
    return wheel


def pip_wheel(tree: Path, out_dir: Path, what: str) -> None:
    """Build the wheel of a source tree into ``out_dir``, offline, with the build tools installed here."""
    command = [
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "--quiet", "--wheel-dir", str(out_dir), str(tree),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"building {what} failed:\n{completed.stdout}\n{completed.stderr}")


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
        "optional_files": list(assignment.optional),
        "minilora_version": __version__,
        "minilora_commit": source_commit(),
        "time_budget_seconds": TIME_BUDGET_SECONDS,
    }
    with tempfile.TemporaryDirectory(prefix="minilora-export-") as tmp:
        wheel = build_wheel(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w") as archive:
            _add(archive, "setup.sh", SETUP_SH.encode(), executable=True)
            _add(archive, "run_autograder", RUN_AUTOGRADER.encode(), executable=True)
            _add(
                archive,
                "requirements.txt",
                "".join(f"{pin}\n" for pin in pinned_requirements(PINNED)).encode(),
            )
            _add(archive, CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
            _add(archive, wheel.name, wheel.read_bytes())
    return out


def pinned_requirements(names) -> list[str]:
    """``name==version`` for each distribution and everything it needs on this Python, as installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pins, queue = {}, list(names)
    while queue:
        name = queue.pop()
        distribution = metadata.distribution(name)
        key = distribution.metadata["Name"].lower()
        if key in pins:
            continue
        pins[key] = f"{distribution.metadata['Name']}=={distribution.version}"
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append(requirement.name)
    return sorted(pin for key, pin in pins.items() if key != "minilora")


def source_commit() -> str:
    """The git commit of the source tree the export was built from ("+dirty" with changes), or "unknown"."""
    source = PACKAGE_DIR.parent

    def git(*arguments):
        completed = subprocess.run(["git", "-C", str(source), *arguments], capture_output=True, text=True)
        return completed.stdout.strip() if completed.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") if shutil.which("git") and (source / ".git").exists() else ""
    return (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or "unknown"


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
    extra = {"seed": score.seed, "minilora_version": __version__, "isolation": score.isolation}
    return {"score": score.earned, "output": "\n".join(lines), "tests": tests, "extra_data": extra}


def run(root) -> dict:
    """Grade root/submission for the assignment in root/source/autograder.json; write root/results/results.json."""
    root = Path(root)
    started = time.monotonic()
    config = json.loads((root / "source" / CONFIG_NAME).read_text())
    results_dir = root / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    budget = config.get("time_budget_seconds", TIME_BUDGET_SECONDS)
    try:
        isolation = choose_isolation()
        submission = collect(root / "submission", config["files"], config.get("optional_files", ()))
        hidden = [root / "submission", root / "source", results_dir]
        score = grade_submission(
            config["assignment"], submission, timeout=budget, isolation=isolation, hidden=hidden
        )
        document = results_document(score, submission.found, submission.missing)
        handed_in = [
            name for name in config.get("optional_files", []) if any((root / "submission").rglob(name))
        ]
        if handed_in:
            document["output"] += f"\nHanded in to be graded by hand: {', '.join(handed_in)}."
    except (NotGraded, RefusedToGrade) as err:  # nothing was graded: say why, to the student and the staff
        document = {"score": 0, "output": f"not graded: {err}", "tests": []}
    except Exception as err:  # the grader itself failed: say so, score nothing
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
