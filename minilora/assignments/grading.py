"""Grading a submission: run the assignment's pytest grader on it and add up the points per part."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .catalog import get_assignment
from .release import student_folder

GRADERS_DIR = Path(__file__).resolve().parent / "graders"


@dataclass
class Score:
    assignment: str
    parts: (
        list  # {"name", "points", "earned", "outcome", "error" (exception type), "message" (its first line)}
    )

    @property
    def earned(self) -> int:
        return sum(part["earned"] for part in self.parts)

    @property
    def total(self) -> int:
        return sum(part["points"] for part in self.parts)

    def table(self) -> str:
        """One line per part (points, outcome), the failure's type and first message line under it."""
        lines = []
        for part in self.parts:
            lines.append(f"{part['name']:<60} {part['earned']}/{part['points']}  {part['outcome']}")
            if part["error"]:
                message = part.get("message", "")
                lines.append(f"    {part['error']}" + (f": {message}" if message else ""))
        return "\n".join(lines + [f"{'total':<60} {self.earned}/{self.total}"])


def grader_path(assignment_id: str) -> Path:
    get_assignment(assignment_id)
    return GRADERS_DIR / f"grade_{assignment_id}.py"


def grade(assignment_id: str, submission_dir, timeout: float = 900) -> Score:
    """Score the release folder ``submission_dir`` (holding student/) with the assignment's grader."""
    submission = Path(submission_dir).resolve()
    student_folder(submission)  # a clear error for a path that is not a release, before pytest runs
    with tempfile.TemporaryDirectory() as tmp:
        score_file = Path(tmp) / "score.json"
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(grader_path(assignment_id)),
            f"--submission={submission}",
            f"--score-json={score_file}",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(GRADERS_DIR),
            "-o",
            "addopts=",
            "-o",
            "python_files=grade_*.py",
        ]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=GRADERS_DIR)
        if not score_file.is_file():
            raise RuntimeError(
                f"the grader of {assignment_id} did not run:\n{completed.stdout}\n{completed.stderr}"
            )
        parts = json.loads(score_file.read_text())
    return Score(assignment_id, parts)
