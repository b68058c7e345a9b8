"""pytest plumbing for the graders: the submission's modules as a fixture, and points per test."""

import json

import pytest

from minilora.assignments.release import load_student

RESULTS = {}


def pytest_addoption(parser):
    parser.addoption("--submission", required=True, help="the release folder that holds student/")
    parser.addoption("--score-json", required=True, help="where to write the parts and their points")


def pytest_configure(config):
    config.addinivalue_line("markers", "points(n): what a test is worth")


@pytest.fixture(scope="session")
def student(request):
    return load_student(request.config.getoption("--submission"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    marker = item.get_closest_marker("points")
    points = marker.args[0] if marker else 0
    if report.when == "setup" and report.failed or report.when == "call":
        error = call.excinfo.typename if call.excinfo else ""
        RESULTS[item.nodeid] = {
            "name": item.name,
            "points": points,
            "earned": points if report.passed else 0,
            "outcome": report.outcome,
            "error": error,
        }


def pytest_sessionfinish(session):
    with open(session.config.getoption("--score-json"), "w") as f:
        json.dump(list(RESULTS.values()), f, indent=2)
