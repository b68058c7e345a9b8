"""Grading a submission: run the assignment's pytest grader on it and add up the points per part."""

from __future__ import annotations

import csv
import json
import os
import secrets
import subprocess
import sys
import threading
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
    seed: int | None = None  # the inputs' seed: grading again with it draws the same inputs

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
        lines.append(f"{'total':<60} {self.earned}/{self.total}")
        if self.seed is not None:
            lines.append(
                f"inputs drawn with seed {self.seed} (grade with --seed {self.seed} to draw them again)"
            )
        return "\n".join(lines)


def grader_path(assignment_id: str) -> Path:
    get_assignment(assignment_id)
    return GRADERS_DIR / f"grade_{assignment_id}.py"


def grade(assignment_id: str, submission_dir, timeout: float = 1800, seed: int | None = None) -> Score:
    """Score the release folder ``submission_dir`` (holding student/) with the assignment's grader.

    The inputs are drawn from ``seed``, a fresh random one by default (it is kept in the Score).

    The grader runs as a pytest process that never imports the student's code (each part reaches it in
    a child process of its own, see sandbox.py) and hands its score back through a pipe that only this
    process holds, so nothing a submission prints, writes or leaves behind can change the score.
    """
    submission = Path(submission_dir).resolve()
    student_folder(submission)  # a clear error for a path that is not a release, before pytest runs
    seed = secrets.randbelow(2**31) if seed is None else int(seed)
    score_read, score_write = os.pipe()
    command = [
        sys.executable, "-m", "pytest", str(grader_path(assignment_id)), f"--submission={submission}",
        f"--assignment={assignment_id}", f"--score-fd={score_write}", f"--seed={seed}", "-q", "-p", "no:cacheprovider",
        "--rootdir", str(GRADERS_DIR), "-o", "addopts=", "-o", "python_files=grade_*.py",
    ]  # fmt: skip
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(_read_all(score_read)), daemon=True)
    reader.start()
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=GRADERS_DIR, pass_fds=(score_write,)
        )
    finally:
        os.close(score_write)
    reader.join()
    if not chunks or not chunks[0]:
        raise RuntimeError(
            f"the grader of {assignment_id} did not run:\n{completed.stdout}\n{completed.stderr}"
        )
    document = json.loads(chunks[0])
    return Score(assignment_id, document["parts"], document["seed"])


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read()


def grade_roster(assignment_id: str, roster_dir, seed: int | None = None) -> dict:
    """Grade every submission of a class: {folder name: Score, or the error that kept it from grading}.

    ``roster_dir`` holds one folder per student, each a release folder with its student/ inside.
    Each student gets inputs of a fresh seed (kept in the CSV), or all of them those of ``seed``.
    """
    roster = Path(roster_dir)
    if not roster.is_dir():
        raise FileNotFoundError(
            f"no roster folder {roster}: pass a folder with one release folder per student"
        )
    folders = sorted(path for path in roster.iterdir() if path.is_dir())
    if not folders:
        raise FileNotFoundError(f"{roster} holds no submission folders")
    results = {}
    for folder in folders:
        try:
            results[folder.name] = grade(assignment_id, folder, seed=seed)
        except (FileNotFoundError, RuntimeError) as err:  # this student's folder, not the whole class
            results[folder.name] = err
    return results


def write_scores_csv(results: dict, path) -> Path:
    """One row per student: earned, total, the points of each part, and the failures' messages."""
    scores = [score for score in results.values() if isinstance(score, Score)]
    parts = list(dict.fromkeys(part["name"] for score in scores for part in score.parts))
    path = Path(path)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["student", "earned", "total", *parts, "messages", "seed"])
        for student, score in results.items():
            if not isinstance(score, Score):
                writer.writerow([student, 0, "", *[""] * len(parts), f"not graded: {score}", ""])
                continue
            earned = {part["name"]: part["earned"] for part in score.parts}
            messages = "; ".join(f"{part['name']}: {part['error']}: {part.get('message', '')}"
                                 for part in score.parts if part["error"])  # fmt: skip
            writer.writerow(
                [
                    student,
                    score.earned,
                    score.total,
                    *[earned.get(name, "") for name in parts],
                    messages,
                    score.seed,
                ]
            )
    return path
