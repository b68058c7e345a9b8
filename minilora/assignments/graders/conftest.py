"""pytest plumbing for the graders: the student's code in a child process per part, and points per part.

This process is the grader: it draws the inputs, checks the numbers and writes the score. The
student's modules are imported only in a child process, a fresh one for each part, reached through
``student["gelu"].gelu_forward(...)`` (see minilora/assignments/sandbox.py); nothing the student's
code does there reaches this process except the data it returns. Each part's record keeps the
failure's type and the first line of its message (a gradient check names the tensor, the index and
both values there; the student's own exceptions come through as "NotImplementedError: a1: ..."). A
part whose calls run past PART_SECONDS is stopped and scores zero; the parts after it still run.

Inputs are drawn afresh for every grading run: each part's ``rng`` is a stream of the run's seed
(``--seed``, chosen by ``grading.grade`` and printed with the score) and the part's name, so no
submission can be fitted to one fixed set of numbers, a run can be reproduced from its seed, and
no part's numbers depend on which parts ran before it.
"""

import json
import os
import zlib

import numpy as np
import pytest

from minilora.assignments.release import hole_functions
from minilora.assignments.sandbox import StudentProcess, first_line

RESULTS = {}
PART_SECONDS_ENV_VAR = "MINILORA_GRADE_PART_SECONDS"
# the wall-clock limit of one part (the slowest reference part takes a few seconds); the variable overrides it
PART_SECONDS = float(os.environ.get(PART_SECONDS_ENV_VAR, "120"))
MESSAGE_CHARS = 300  # of the first line of a failure's message, kept in the score


def pytest_addoption(parser):
    parser.addoption("--submission", required=True, help="the release folder that holds student/")
    parser.addoption("--assignment", required=True, help="the assignment's id, e.g. a1")
    parser.addoption("--score-fd", required=True, type=int, help="the file descriptor to write the score to")
    parser.addoption("--seed", required=True, type=int, help="the seed this run's inputs are drawn from")


def pytest_configure(config):
    config.addinivalue_line("markers", "points(n): what a test is worth")


@pytest.fixture
def student(request):
    """A fresh child process holding the submission's modules, for this part only."""
    guarded = hole_functions(request.config.getoption("--assignment"))
    process = StudentProcess(request.config.getoption("--submission"), guarded, PART_SECONDS)
    yield process
    process.close()


@pytest.fixture
def rng(request):
    """This part's inputs: a generator seeded with the run's seed and the part's name."""
    return np.random.default_rng([request.config.getoption("--seed"), zlib.crc32(request.node.name.encode())])


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
            "message": first_line(str(call.excinfo.value), MESSAGE_CHARS) if call.excinfo else "",
        }


def pytest_sessionfinish(session):
    """The score goes to a pipe that only the process running ``grading.grade`` reads."""
    with os.fdopen(session.config.getoption("--score-fd"), "w") as score:
        json.dump({"seed": session.config.getoption("--seed"), "parts": list(RESULTS.values())}, score)
