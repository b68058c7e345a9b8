"""The check that keeps the assignments honest, for every assignment:

1. the reference (a release with every hole filled) scores full marks;
2. the untouched release scores zero, and the grader still runs to the end;
3. each planted bug (bugs/<id>_*.patch, applied to the reference release with ``git apply``) loses
   points, and loses them on a numeric check (an assertion or a gradient check), not by crashing;
4. every score is the same on each of the seeds it is graded on (three fresh ones by default), so
   two students with the same code get the same mark whatever inputs their run drew.
"""

from __future__ import annotations

import secrets
import subprocess
import tempfile
from pathlib import Path

from .catalog import ASSIGNMENTS
from .grading import grade
from .release import STUDENT_DIR, release

BUGS_DIR = Path(__file__).resolve().parent / "bugs"
NUMERIC_FAILURES = {"AssertionError", "GradCheckError", "ArgumentModified"}
SEEDS = 3  # how many seeds verify grades everything on


def planted_bugs(assignment_id: str) -> list[Path]:
    return sorted(BUGS_DIR.glob(f"{assignment_id}_*.patch"))


def apply_patch(release_dir: Path, patch: Path) -> None:
    """Apply a unified diff (paths a/<file>, b/<file>) to a release's student/ folder."""
    completed = subprocess.run(
        ["git", "apply", "-p1", str(patch)],
        cwd=Path(release_dir) / STUDENT_DIR,
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{patch.name} no longer applies to the reference: {completed.stderr.strip()}")


def verify(assignment_id: str, seeds=None) -> dict:
    """Grade the reference, the blank release and every planted bug on each seed: {name: [Score per seed]}.

    ``seeds`` defaults to SEEDS fresh ones (kept in each Score), so a planted bug that slips through
    can be graded again on the very inputs that missed it.
    """
    seeds = [secrets.randbelow(2**31) for _ in range(SEEDS)] if seeds is None else list(seeds)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        release(assignment_id, tmp / "reference", solved=True)
        release(assignment_id, tmp / "blank")
        folders = {"reference": tmp / "reference", "blank": tmp / "blank"}
        for patch in planted_bugs(assignment_id):
            folders[patch.stem] = tmp / patch.stem
            release(assignment_id, folders[patch.stem], solved=True)
            apply_patch(folders[patch.stem], patch)
        return {
            name: [grade(assignment_id, folder, seed=seed) for seed in seeds]
            for name, folder in folders.items()
        }


def problems(assignment_id: str, scores: dict) -> list[str]:
    """What is wrong with an assignment's scores, {name: [Score per seed]} (empty when the pipeline holds)."""
    found = []
    for name, runs in scores.items():
        earned = [score.earned for score in runs]
        if len(set(earned)) > 1:
            seeds = [score.seed for score in runs]
            found.append(f"{name} scores {earned} on seeds {seeds}: its score depends on the inputs drawn")
    for reference in scores["reference"]:
        if reference.earned != reference.total:
            found.append(f"the reference scores {reference.earned}/{reference.total} (seed {reference.seed})")
    for blank in scores["blank"]:
        if blank.earned != 0 or len(blank.parts) != len(scores["reference"][0].parts):
            found.append(
                f"the blank release scores {blank.earned}/{blank.total} over {len(blank.parts)} parts"
            )
    bugs = [name for name in scores if name not in ("reference", "blank")]
    if len(bugs) < 2:
        found.append(f"only {len(bugs)} planted bugs")
    for name in bugs:
        for score in scores[name]:
            lost = [part for part in score.parts if part["earned"] < part["points"]]
            if not lost:
                found.append(f"{name} loses no points (seed {score.seed})")
            elif not any(part["error"] in NUMERIC_FAILURES for part in lost):
                found.append(f"{name} loses points only through {[part['error'] for part in lost]}")
    return found


def verify_all() -> dict:
    return {assignment_id: verify(assignment_id) for assignment_id in ASSIGNMENTS}
