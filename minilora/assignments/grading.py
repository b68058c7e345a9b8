"""Grading a submission: run the assignment's pytest grader on it and add up the points per part.

A submission is read into memory first (``collect``: the assignment's files, found by one layout rule
here and on Gradescope), so nothing that runs later can change what is graded. The grader runs as a
pytest process that never imports the student's code: each part reaches it in a child process of
its own (sandbox.py), at the isolation level of isolation.py. The score comes back through a pipe
only this process holds and counts only when pytest ended normally and the score carries this run's
nonce, a secret that no process's arguments show.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import get_assignment
from .integrity import check_graders
from .isolation import Isolation, RefusedToGrade, choose_isolation, harden_grader
from .sandbox import PACKAGE_DIR, STUDENT_DIR, children, kill_descendants
from .student_build import is_student_build, write_student_package

GRADERS_DIR = Path(__file__).resolve().parent / "graders"
PYTEST_NORMAL_EXITS = (0, 1)  # all parts passed; some failed
TIME_LIMIT_SECONDS = 1800  # of one submission's whole grading run
CHILD_LEAVES_OUT = ("fast",)  # the fast path holds twins of the graded bodies; the child never runs it


class NotGraded(RuntimeError):
    """This submission could not be graded (nothing to grade, or its run broke); the class goes on."""


@dataclass
class Submission:
    """The assignment's files of one submission, as read before anything ran."""

    name: str  # the folder's name, never its full path
    files: dict  # {file name: bytes}
    found: list  # where each file was found, relative to the folder
    missing: list  # the assignment's file names it lacks


@dataclass
class Score:
    assignment: str
    parts: (
        list  # {"name", "points", "earned", "outcome", "error" (exception type), "message" (its first line)}
    )
    seed: int | None = None  # the inputs' seed: grading again with it draws the same inputs
    isolation: str = ""  # the isolation level the parts ran at
    missing: list = field(default_factory=list)  # the assignment's files the submission lacked

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
        if self.missing:
            lines.append(f"missing: {', '.join(self.missing)}")
        if self.seed is not None:
            lines.append(
                f"inputs drawn with seed {self.seed} (grade with --seed {self.seed} to draw them again)"
            )
        if self.isolation:
            lines.append(f"isolation: {self.isolation}")
        return "\n".join(lines)


def grader_path(assignment_id: str) -> Path:
    get_assignment(assignment_id)
    return GRADERS_DIR / f"grade_{assignment_id}.py"


def collect(folder, files, optional=()) -> Submission:
    """Read ``files`` (names) from a submission folder: each from the shallowest place that has it
    (the folder's top, its student/, or any other folder); symlinks and other files are ignored.
    The ``optional`` Python files are read too where present (a6: the student's own a1-a3 layers)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotGraded(f"{folder.name}: not a folder")
    contents, found, missing = {}, [], []
    for name in [*files, *(name for name in optional if name.endswith(".py"))]:
        chosen = shallowest(folder, name)
        if chosen is None:
            missing += [name] if name in files else []
            continue
        contents[name] = chosen.read_bytes()
        found.append(str(chosen.relative_to(folder)))
    if not any(name in contents for name in files):
        raise NotGraded(f"{folder.name}: none of the assignment's files ({', '.join(files)}) is in it")
    return Submission(folder.name, contents, found, missing)


def shallowest(folder: Path, name: str):
    """The file called ``name`` nearest the top of ``folder`` (ties: by path), or None."""
    candidates = [
        path
        for path in folder.rglob(name)
        if path.is_file() and not path.is_symlink() and "__MACOSX" not in path.parts
    ]
    return min(candidates, key=lambda path: (len(path.relative_to(folder).parts), str(path)), default=None)


def assignment_files(assignment_id: str) -> list[str]:
    return [Path(relative).name for relative in get_assignment(assignment_id).sources]


def optional_files(assignment_id: str) -> tuple:
    return get_assignment(assignment_id).optional


def grade(assignment_id: str, submission_dir, timeout: float = TIME_LIMIT_SECONDS, seed: int | None = None,
          isolation: Isolation | None = None, hidden=(), parts: str | None = None) -> Score:  # fmt: skip
    """Score the submission in ``submission_dir`` (a release folder, or the files themselves).

    The inputs are drawn from ``seed``, a fresh random one by default (it is kept in the Score).
    ``hidden`` are folders a namespace child must see empty (the submission's own folder always is).
    ``parts`` keeps only the parts whose names match it (pytest's ``-k`` expression): a quick regrade.
    """
    submission = collect(submission_dir, assignment_files(assignment_id), optional_files(assignment_id))
    hidden = [Path(submission_dir).resolve(), *hidden]
    return grade_submission(assignment_id, submission, timeout, seed, isolation, hidden, parts)


def grade_submission(assignment_id, submission: Submission, timeout=TIME_LIMIT_SECONDS, seed=None,
                     isolation: Isolation | None = None, hidden=(), parts: str | None = None) -> Score:  # fmt: skip
    """Score a collected submission (see ``grade``)."""
    if is_student_build():
        raise RefusedToGrade(
            "this is a student build of minilora, which holds no graders: grading runs on the course's "
            "autograder or on an instructor's install"
        )
    check_graders()
    isolation = isolation or choose_isolation()
    harden_grader()
    seed = secrets.randbelow(2**31) if seed is None else int(seed)
    with tempfile.TemporaryDirectory(prefix="minilora-grade-") as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)  # the sandbox user reads the student build, never the snapshot (0700)
        snapshot = tmp / "submission"
        (snapshot / STUDENT_DIR).mkdir(parents=True)
        snapshot.chmod(0o700)
        for name, data in submission.files.items():
            (snapshot / STUDENT_DIR / name).write_bytes(data)
        build = readable(write_student_package(tmp / "build", [assignment_id], leave_out=CHILD_LEAVES_OUT))
        hidden = [*hidden, snapshot, *source_tree_secrets()]
        graded = run_grader(
            assignment_id, snapshot, build, isolation, hidden, seed, timeout, submission.name, parts
        )
    check_graders(f"while grading {submission.name}")
    return Score(assignment_id, graded, seed, isolation.describe(), submission.missing)


def run_grader(assignment_id, snapshot, build, isolation, hidden, seed, timeout, name, parts=None) -> list:
    """Run the pytest grader; its parts, once the run is known to be whole and its own."""
    nonce = secrets.token_hex(16)
    score_read, score_write = os.pipe()
    nonce_read, nonce_write = os.pipe()
    command = [
        sys.executable, "-m", "pytest", str(grader_path(assignment_id)), f"--submission={snapshot}",
        f"--assignment={assignment_id}", f"--score-fd={score_write}", f"--nonce-fd={nonce_read}",
        f"--seed={seed}", f"--build={build}", f"--isolation={isolation.level}",
        f"--sandbox-ids={json.dumps([isolation.uid, isolation.gid])}", f"--hide={json.dumps(list(map(str, hidden)))}",
        f"--deadline={time.time() + timeout}", "-q", "-p", "no:cacheprovider", "--rootdir", str(GRADERS_DIR),
        "-o", "addopts=", "-o", "python_files=grade_*.py", *(["-k", parts] if parts else []),
    ]  # fmt: skip
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(_read_all(score_read)), daemon=True)
    reader.start()
    before = children()  # the caller's own children: never the grader's to kill
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=GRADERS_DIR, pass_fds=(score_write, nonce_read))  # fmt: skip
    os.close(score_write)
    os.close(nonce_read)
    with os.fdopen(nonce_write, "w") as pipe:
        pipe.write(nonce)
    try:
        output, _ = process.communicate(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        output = ""
    finally:
        process.wait()
        kill_descendants(spare=before)  # whatever the grader's children left behind when it ended
    if process.returncode == -9 and not output:
        raise NotGraded(f"{name}: grading ran past its limit of {timeout:.0f} s")
    reader.join()
    if process.returncode not in PYTEST_NORMAL_EXITS:
        raise NotGraded(f"{name}: the grader did not finish (exit code {process.returncode}); last output: "
                        f"{output.strip().splitlines()[-1:] or ''}")  # fmt: skip
    try:
        document = json.loads(chunks[0]) if chunks else None
    except json.JSONDecodeError:
        document = None
    if not document or document.get("nonce") != nonce:
        raise NotGraded(f"{name}: the grader's score did not come back whole; nothing is scored")
    return document["parts"]


def readable(build: Path) -> Path:
    """Let every user read the student build (the sandbox user imports it)."""
    for path in (build, *build.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return build


def source_tree_secrets() -> list[Path]:
    """Folders of a source checkout that hold the reference bodies: its git history."""
    git = PACKAGE_DIR.parent / ".git"
    return [git] if git.is_dir() else []


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read()


def grade_roster(assignment_id: str, roster_dir, seed: int | None = None, sandbox_user: str | None = None,
                 isolation: Isolation | None = None, parts: str | None = None) -> dict:  # fmt: skip
    """Grade every submission of a class: {folder name: Score, or the NotGraded that kept it from grading}.

    ``roster_dir`` holds one folder per student. Every submission is read before the first one runs,
    so no submission can change a classmate's files before they are graded. All are graded on the
    inputs of one seed (drawn once, or ``seed``), so identical code scores identically.
    """
    roster = Path(roster_dir)
    if not roster.is_dir():
        raise FileNotFoundError(
            f"no roster folder {roster}: pass a folder with one submission folder per student"
        )
    folders = sorted(path for path in roster.iterdir() if path.is_dir())
    if not folders:
        raise FileNotFoundError(f"{roster} holds no submission folders")
    seed = secrets.randbelow(2**31) if seed is None else int(seed)
    isolation = isolation or choose_isolation(sandbox_user)
    files = assignment_files(assignment_id)
    results = {}
    for folder in folders:
        try:
            results[folder.name] = collect(folder, files, optional_files(assignment_id))
        except NotGraded as err:
            results[folder.name] = err
    for name, submission in results.items():
        if isinstance(submission, Submission):
            try:
                results[name] = grade_submission(assignment_id, submission, seed=seed, isolation=isolation,
                                                 hidden=[roster.resolve()], parts=parts)  # fmt: skip
            except NotGraded as err:
                results[name] = err
    return results


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads a cell that starts so as a formula


def cell(value) -> str:
    """A CSV cell a spreadsheet shows as text: a leading apostrophe keeps ``=2+3`` from being a formula."""
    text = str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def write_scores_csv(results: dict, path) -> Path:
    """One row per student: graded or not, earned, total, each part's points, the failures, the seed.

    A submission that could not be graded says so in its status, with empty points: never a zero.
    """
    scores = [score for score in results.values() if isinstance(score, Score)]
    parts = list(dict.fromkeys(part["name"] for score in scores for part in score.parts))
    path = Path(path)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["student", "status", "earned", "total", *parts, "messages", "seed"])
        for student, score in results.items():
            if not isinstance(score, Score):
                writer.writerow(map(cell, [student, "not graded", "", "", *[""] * len(parts), score, ""]))
                continue
            earned = {part["name"]: part["earned"] for part in score.parts}
            messages = "; ".join(f"{part['name']}: {part['error']}: {part.get('message', '')}"
                                 for part in score.parts if part["error"])  # fmt: skip
            row = [student, "graded", score.earned, score.total, *[earned.get(name, "") for name in parts],
                   messages, score.seed]  # fmt: skip
            writer.writerow(map(cell, row))
    return path
