"""pytest plumbing for the graders: the submission's modules as a fixture, points per test, a time limit per part.

Each test is one part. Its record keeps the exception's type and the first line of its message (a
gradient check names the tensor, the index and both values there), so a student sees what was
wrong, not only that something was. A part that runs past PART_SECONDS is stopped by an alarm and
scores zero; the parts after it still run.
"""

import json
import os
import signal

import pytest

from minilora.assignments.release import load_student

RESULTS = {}
PART_SECONDS_ENV_VAR = "MINILORA_GRADE_PART_SECONDS"
# wall-clock limit of one part (the slowest reference part takes a few seconds); the variable overrides it
PART_SECONDS = int(os.environ.get(PART_SECONDS_ENV_VAR, "120"))
MESSAGE_CHARS = 300  # of the first line of a failure's message, kept in the score


class PartTimeout(Exception):
    """A part ran past its time limit (an endless loop, or far too slow)."""


def pytest_addoption(parser):
    parser.addoption("--submission", required=True, help="the release folder that holds student/")
    parser.addoption("--score-json", required=True, help="where to write the parts and their points")


def pytest_configure(config):
    config.addinivalue_line("markers", "points(n): what a test is worth")


@pytest.fixture(scope="session")
def student(request):
    return load_student(request.config.getoption("--submission"))


def _stop_the_part(signum, frame):
    raise PartTimeout(f"the part ran past its limit of {PART_SECONDS} s: is there an endless loop?")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not hasattr(signal, "SIGALRM"):  # not on Windows: no limit there
        yield
        return
    previous = signal.signal(signal.SIGALRM, _stop_the_part)
    signal.alarm(PART_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def first_line(excinfo) -> str:
    lines = [line for line in str(excinfo.value).splitlines() if line.strip()]
    return lines[0][:MESSAGE_CHARS] if lines else ""


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
            "message": first_line(call.excinfo) if call.excinfo else "",
        }


def pytest_sessionfinish(session):
    with open(session.config.getoption("--score-json"), "w") as f:
        json.dump(list(RESULTS.values()), f, indent=2)
