"""pytest plumbing for the graders: the student's code in a child process per part, and points per part.

This process is the grader: it draws the inputs, checks the numbers and writes the score. It makes
itself non-dumpable first (isolation.harden_grader), so no child can open its /proc entries. The
student's modules are imported only in a child process, a fresh one for each part, reached through
``student["gelu"].gelu_forward(...)`` (see minilora/assignments/sandbox.py); nothing the student's
code does there reaches this process except the data it returns. Each part's record keeps the
failure's type and the first line of its message (a gradient check names the tensor, the index and
both values there; the student's own exceptions come through as "NotImplementedError: a1: ...").
A part whose calls run past PART_SECONDS, or past what is left of the run's time budget, is stopped
and scores zero; the parts after it still run.

Inputs are drawn afresh for every grading run: each part's ``rng`` is a stream of the run's seed
(``--seed``, chosen by ``grading.grade`` and printed with the score) and the part's name, so no
submission can be fitted to one fixed set of numbers, a run can be reproduced from its seed, and
no part's numbers depend on which parts ran before it.
"""

import json
import os
import time
import zlib

import numpy as np
import pytest

from minilora.assignments.isolation import Isolation, harden_grader
from minilora.assignments.sandbox import PACKAGE_DIR, StudentProcess, first_line

RESULTS = {}
PART_SECONDS_ENV_VAR = "MINILORA_GRADE_PART_SECONDS"
# the wall-clock limit of one part (the slowest reference part takes a few seconds); the variable overrides it
PART_SECONDS = float(os.environ.get(PART_SECONDS_ENV_VAR, "120"))
MESSAGE_CHARS = 300  # of the first line of a failure's message, kept in the score
NUMPY_HEADERS = ("Not equal to tolerance", "Arrays are not")  # numpy.testing's first line; err_msg follows it


def pytest_addoption(parser):
    parser.addoption("--submission", required=True, help="the folder that holds the submission's student/")
    parser.addoption("--assignment", required=True, help="the assignment's id, e.g. a1")
    parser.addoption("--score-fd", required=True, type=int, help="the file descriptor to write the score to")
    parser.addoption(
        "--nonce-fd", required=True, type=int, help="the file descriptor to read the run's nonce from"
    )
    parser.addoption("--seed", required=True, type=int, help="the seed this run's inputs are drawn from")
    parser.addoption("--build", required=True, help="the folder holding the student build's minilora/")
    parser.addoption("--isolation", required=True, help="namespaces, user or process (isolation.py)")
    parser.addoption("--sandbox-ids", default="[null, null]", help="[uid, gid] of the sandbox user, as JSON")
    parser.addoption("--hide", default="[]", help="folders a namespace child sees empty, as JSON")
    parser.addoption("--deadline", type=float, default=float("inf"), help="the run's end, as a Unix time")


def pytest_configure(config):
    harden_grader()
    with os.fdopen(config.getoption("--nonce-fd"), "r") as pipe:
        config.nonce = pipe.read()
    config.addinivalue_line("markers", "points(n): what a test is worth")


@pytest.fixture
def student(request):
    """A fresh child process holding the submission's modules, for this part only."""
    options = request.config.getoption
    seconds = min(PART_SECONDS, options("--deadline") - time.time())
    if seconds <= 0:
        pytest.fail("the grading run's time budget was spent before this part started")
    uid, gid = json.loads(options("--sandbox-ids"))
    process = StudentProcess(options("--submission"), options("--build"), Isolation(options("--isolation"), uid, gid),
                             seconds, json.loads(options("--hide")))  # fmt: skip
    request.node.workspace = process.workspace
    yield process
    process.close()


@pytest.fixture
def rng(request):
    """This part's inputs: a generator seeded with the run's seed and the part's name."""
    return np.random.default_rng([request.config.getoption("--seed"), zlib.crc32(request.node.name.encode())])


def summary(text: str, item) -> str:
    """A failure's first line, with numpy.testing's err_msg (what was compared) kept in it, and no
    path of this machine."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if (
        len(lines) > 1
        and lines[0].startswith(NUMPY_HEADERS)
        and not lines[1].startswith(("Mismatch", "Max ", "("))
    ):
        lines = [f"{lines[1]}: {lines[0]}"]
    line = lines[0] if lines else ""
    option = item.config.getoption
    places = {getattr(item, "workspace", None): "<part folder>", PACKAGE_DIR.parent: "<minilora>",
              option("--submission"): "<submission>", option("--build"): "<minilora>"}  # fmt: skip
    for place, name in places.items():
        if place:
            line = line.replace(os.fspath(place), name)
    return first_line(line, MESSAGE_CHARS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    marker = item.get_closest_marker("points")
    points = marker.args[0] if marker else 0
    if report.when == "setup" and report.failed or report.when == "call":
        RESULTS[item.nodeid] = {
            "name": item.name,
            "points": points,
            "earned": points if report.passed else 0,
            "outcome": report.outcome,
            "error": call.excinfo.typename if call.excinfo else "",
            "message": summary(str(call.excinfo.value), item) if call.excinfo else "",
        }


def pytest_sessionfinish(session):
    """The score, with the run's nonce, goes to a pipe that only the process running grading.grade reads."""
    document = {"seed": session.config.getoption("--seed"), "nonce": session.config.nonce,
                "parts": list(RESULTS.values())}  # fmt: skip
    with os.fdopen(session.config.getoption("--score-fd"), "w") as score:
        json.dump(document, score)
