"""The Gradescope export: an unpacked autograder zip, with minilora installed from the zip's own wheel
(setup.sh's apt and pip steps skipped), grades the reference to full marks and a blank release to
zero, in Gradescope's results.json format, through the same isolated grader as `grade`."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from minilora.assignments.gradescope import CONFIG_NAME, PYTHON_ENV_VAR, ROOT_ENV_VAR, SANDBOX_USER
from minilora.assignments.handout import grader_parts, part_title
from minilora.assignments.release import release
from minilora.cli import main

PARTS_A1 = len(grader_parts("a1"))
POINTS_A1 = sum(points for _, points in grader_parts("a1"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """a1's autograder as the command line exports it, unpacked, and its wheel installed into a folder."""
    folder = tmp_path_factory.mktemp("gradescope")
    archive_path = folder / "a1-autograder.zip"
    main(["assignment", "export", "a1", "--gradescope", "--out", str(archive_path)])
    with zipfile.ZipFile(archive_path) as archive:
        modes = {info.filename: info.external_attr >> 16 for info in archive.infolist()}
        archive.extractall(folder / "source")
    (wheel,) = (folder / "source").glob("minilora-*.whl")
    site = (
        folder / "site"
    )  # "minilora already installed": the exported wheel itself, without its dependencies
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet"]
    subprocess.run([*pip, "--target", str(site), str(wheel)], check=True)
    return SimpleNamespace(source=folder / "source", modes=modes, wheel=wheel, site=site)


def environment(exported, root: Path) -> dict:
    return {
        **os.environ,
        ROOT_ENV_VAR: str(root),
        PYTHON_ENV_VAR: sys.executable,
        "PYTHONPATH": str(exported.site),
    }


def run_autograder(exported, root: Path) -> dict:
    """Lay out root/ as Gradescope does (source/, submission/), run source/run_autograder, read results.json."""
    shutil.copytree(exported.source, root / "source")
    completed = subprocess.run(
        ["bash", str(root / "source" / "run_autograder")],
        env=environment(exported, root),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads((root / "results" / "results.json").read_text())


def submit(root: Path, files: dict) -> None:
    """Put the student's files (name in the submission -> text) where Gradescope puts them."""
    for name, text in files.items():
        path = root / "submission" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def student_files(tmp_path, solved: bool) -> dict:
    release("a1", tmp_path / ("solved" if solved else "blank"), solved=solved)
    folder = tmp_path / ("solved" if solved else "blank") / "student"
    return {path.name: path.read_text() for path in folder.glob("*.py")}


def test_the_zip_holds_an_executable_setup_and_run_script_the_config_and_a_wheel_with_the_graders(exported):
    expected = ["setup.sh", "run_autograder", "requirements.txt", CONFIG_NAME, exported.wheel.name]
    assert sorted(exported.modes) == sorted(expected)
    assert exported.modes["setup.sh"] & 0o111 and exported.modes["run_autograder"] & 0o111
    config = json.loads((exported.source / CONFIG_NAME).read_text())
    assert config["assignment"] == "a1" and config["files"] == ["linear.py", "gelu.py", "cross_entropy.py"]
    for script in ("setup.sh", "run_autograder"):
        subprocess.run(["bash", "-n", str(exported.source / script)], check=True)  # both parse
    setup = (exported.source / "setup.sh").read_text()
    assert "minilora-*.whl" in setup and "requirements.txt" in setup and "useradd --system" in setup
    assert SANDBOX_USER in setup and 'chmod -R o-rwx "$SOURCE"' in setup  # the answers closed to that user
    pins = (exported.source / "requirements.txt").read_text().split()
    assert {pin.split("==")[0].lower() for pin in pins} >= {"numpy", "pytest", "pluggy", "iniconfig"}
    assert all("==" in pin for pin in pins)  # every dependency at the version the export ran with
    assert config["minilora_commit"] and config["time_budget_seconds"] < 600  # under the default timeout
    with zipfile.ZipFile(exported.wheel) as wheel:
        names = set(wheel.namelist())
    for name in (
        "graders/grade_a1.py",
        "graders/conftest.py",
        "graders/SHA256SUMS",
        "sandbox_child.py",
        "handouts/a1.md",
    ):
        assert f"minilora/assignments/{name}" in names, name
    # the grading below runs this wheel's minilora, not the source tree's
    where = subprocess.run(
        [sys.executable, "-c", "import minilora; print(minilora.__file__)"],
        env=environment(exported, exported.site),
        cwd=exported.site.parent,  # as run_autograder runs it: from the root, not from a source tree
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(exported.site)


@pytest.mark.slow
def test_the_reference_scores_full_marks_in_gradescopes_format(exported, tmp_path):
    submit(tmp_path / "root", student_files(tmp_path, solved=True))
    results = run_autograder(exported, tmp_path / "root")
    assert results["score"] == POINTS_A1
    assert [(test["name"], test["max_score"]) for test in results["tests"]] == [
        (part_title(name), points) for name, points in grader_parts("a1")
    ]  # one Gradescope test per graded part, worth the grader's points
    for test in results["tests"]:
        assert set(test) >= {"name", "score", "max_score", "output"}
        assert test["score"] == test["max_score"] and test["status"] == "passed", test
    assert f"a1: {POINTS_A1}/{POINTS_A1}" in results["output"] and "--seed" in results["output"]
    assert results["extra_data"]["isolation"]
    assert isinstance(results["execution_time"], float)


def test_a_blank_release_scores_zero_and_each_part_says_why(exported, tmp_path):
    submit(tmp_path / "root", student_files(tmp_path, solved=False))
    results = run_autograder(exported, tmp_path / "root")
    assert results["score"] == 0 and len(results["tests"]) == PARTS_A1
    for test in results["tests"]:
        assert test["score"] == 0 and test["status"] == "failed"
        assert "NotImplementedError: a1: " in test["output"], test


def test_files_are_found_in_a_folder_a_missing_one_costs_its_parts_and_extra_files_are_ignored(
    exported, tmp_path
):
    files = student_files(tmp_path, solved=True)
    del files["gelu.py"]
    submission = {f"student/{name}": text for name, text in files.items()}
    submission["gelu.py.bak"] = "not gelu.py"
    submission["conftest.py"] = (
        "import os\nos._exit(0)\n"  # would stop a grader that collected the submission
    )
    submit(tmp_path / "root", submission)
    results = run_autograder(exported, tmp_path / "root")
    scores = {test["name"]: test for test in results["tests"]}
    assert scores["linear backward matches finite differences"]["score"] == 3
    assert scores["cross entropy backward matches finite differences"]["score"] == 2
    assert scores["gelu backward matches finite differences"]["score"] == 0
    assert "gelu.py is missing" in scores["gelu forward on drawn inputs"]["output"]
    lost = [test for test in results["tests"] if test["score"] < test["max_score"]]
    assert lost and all("gelu.py is missing" in test["output"] for test in lost)  # only the GELU parts
    assert results["score"] == POINTS_A1 - sum(test["max_score"] for test in lost)
    assert "Missing: gelu.py." in results["output"] and "student/linear.py" in results["output"]


FORGER = """
import json
try:  # a fake score where Gradescope reads the results, written while the submission is imported
    open("{results}", "w").write(json.dumps({{"score": 99, "tests": []}}))
except OSError:
    pass
"""


def test_a_results_file_forged_by_the_submission_is_overwritten_by_the_graders(exported, tmp_path):
    root = tmp_path / "root"
    files = student_files(tmp_path, solved=False)
    files["linear.py"] += FORGER.format(results=root / "results" / "results.json")
    submit(root, files)
    results = run_autograder(exported, root)
    assert results["score"] == 0 and len(results["tests"]) == PARTS_A1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="Gradescope grades as root")
def test_as_root_the_students_code_runs_as_the_sandbox_user_and_without_one_nothing_runs(
    exported, tmp_path, monkeypatch
):
    """Gradescope runs everything as root; setup.sh's user runs the student's code, or nothing does."""
    root = tmp_path / "root"
    files = student_files(tmp_path, solved=True)
    files["linear.py"] += FORGER.format(results=root / "results" / "results.json")
    submit(root, files)
    results = run_autograder(exported, root)
    assert results["score"] == POINTS_A1  # the reference still scores: the children ran, as the sandbox user
    assert SANDBOX_USER in results["extra_data"]["isolation"]
    monkeypatch.setenv("MINILORA_SANDBOX_USER", "no-such-user-here")
    submit(tmp_path / "again", files)
    refused = run_autograder(exported, tmp_path / "again")
    assert refused["score"] == 0 and refused["tests"] == []
    assert refused["output"].startswith("not graded: refusing to grade as root: there is no sandbox user")
