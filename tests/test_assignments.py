"""The assignment pipeline, both directions: the reference gets full marks, a blank release zero,
and every planted bug loses points on a numeric check."""

import time

import pytest

import minilora
from minilora.assignments.catalog import ASSIGNMENTS
from minilora.assignments.grading import NotGraded, Score, grade
from minilora.assignments.pipeline import planted_bugs, problems, verify
from minilora.assignments.release import release, student_copy

VERIFY_SEED = 20261202  # CI verifies on one fixed seed; `minilora assignment verify` on three fresh ones


@pytest.mark.slow
@pytest.mark.parametrize("assignment_id", sorted(ASSIGNMENTS))
def test_reference_scores_full_marks_blank_scores_zero_and_planted_bugs_lose_points(assignment_id):
    scores = verify(assignment_id, seeds=[VERIFY_SEED])
    assert {score.seed for runs in scores.values() for score in runs} == {VERIFY_SEED}
    for name, runs in scores.items():
        print(f"{assignment_id} {name}: {runs[0].earned}/{runs[0].total}")
    assert len(planted_bugs(assignment_id)) >= 5
    assert problems(assignment_id, scores) == []


def test_a_score_that_depends_on_the_seed_is_a_problem_of_the_pipeline():
    def score(seed, earned):
        parts = [{"name": "p", "points": 2, "earned": earned, "outcome": "", "error": "AssertionError"}]
        return Score("a1", parts, seed)

    scores = {"reference": [score(1, 2), score(2, 2)], "blank": [score(1, 0), score(2, 0)],
              "bug_a": [score(1, 0), score(2, 0)], "bug_b": [score(1, 0), score(2, 2)]}  # fmt: skip
    found = problems("a1", scores)
    assert found[0] == "bug_b scores [0, 2] on seeds [1, 2]: its score depends on the inputs drawn"
    assert "bug_b loses no points (seed 2)" in found and not [line for line in found if "bug_a" in line]


def test_a_release_opens_only_its_own_holes():
    source = (
        "def f(x):\n    # BEGIN SOLUTION a1: double it\n    y = 2 * x\n    # END SOLUTION\n    return y\n"
        "def g(x):\n    # BEGIN SOLUTION a2: add one\n    y = x + 1\n    # END SOLUTION\n    return y\n"
        "from ..backend import matmul\nfrom .linear import linear_forward\n"
    )
    text = student_copy(source, "a1", "minilora.layers")
    assert 'raise NotImplementedError("a1: double it")' in text and "y = 2 * x" not in text
    assert "y = x + 1" in text and "SOLUTION" not in text
    assert "from minilora.backend import matmul" in text and "from minilora.layers.linear import" in text
    assert "y = 2 * x" in student_copy(source, "a1", "minilora.layers", solved=True)


def test_release_writes_the_stub_modules_and_a_notebook(tmp_path):
    import nbformat

    release("a3", tmp_path)
    assert (tmp_path / "student" / "attention.py").is_file()
    notebook = nbformat.read(tmp_path / "a3.ipynb", as_version=4)
    assert "Causal self-attention" in notebook.cells[0].source


@pytest.mark.parametrize("assignment_id", sorted(ASSIGNMENTS))
def test_a_student_copy_imports_nothing_from_the_fast_path(assignment_id, tmp_path):
    """A blank hole must stay a hole on a GPU too: no student file may reach a fused kernel."""
    import ast

    release(assignment_id, tmp_path)
    for path in (tmp_path / "student").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        ]
        assert imported, f"{path.name} imports nothing: the parse found no imports"
        assert not [name for name in imported if name and name.startswith("minilora.fast")], path.name


def test_release_refuses_to_overwrite_a_student_folder_unless_forced(tmp_path):
    import json

    release("a1", tmp_path)
    work = tmp_path / "student" / "gelu.py"
    work.write_text("# a student's work\n")
    with pytest.raises(FileExistsError, match="--force"):
        release("a1", tmp_path)
    assert work.read_text() == "# a student's work\n"  # nothing was touched
    release("a1", tmp_path, force=True)
    assert "NotImplementedError" in work.read_text()
    record = json.loads((tmp_path / "release.json").read_text())
    assert record["assignment"] == "a1" and record["minilora_version"] == minilora.__version__


def test_a_folder_without_the_assignments_files_is_not_graded_and_a_flat_upload_is(tmp_path):
    with pytest.raises(NotGraded, match=r"none of the assignment's files \(linear.py, gelu.py"):
        grade("a1", tmp_path)
    release("a1", tmp_path / "release", solved=True)
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in (tmp_path / "release" / "student").glob("*.py"):  # the files handed in without their folder
        (flat / path.name).write_bytes(path.read_bytes())
    score = grade("a1", flat, parts="linear_forward")
    assert score.earned == score.total > 0 and not score.missing


def part(score, name):
    (found,) = [p for p in score.parts if p["name"] == name]
    return found


def test_a_broken_file_costs_only_its_own_parts_and_a_failure_says_what_was_wrong(tmp_path):
    release("a1", tmp_path, solved=True)
    (tmp_path / "student" / "gelu.py").write_text("def gelu_forward(x:\n")  # a syntax error
    cross_entropy = tmp_path / "student" / "cross_entropy.py"
    cross_entropy.write_text(
        cross_entropy.read_text().replace("* (dloss * cache.weights[:, None])", "* dloss")
    )  # forgot the mean
    score = grade("a1", tmp_path)
    assert part(score, "test_linear_backward_matches_finite_differences")["earned"] == 3
    assert part(score, "test_gelu_forward_on_drawn_inputs")["earned"] == 0
    assert (
        "gelu.py does not import: SyntaxError" in part(score, "test_gelu_forward_on_drawn_inputs")["message"]
    )
    failed = part(score, "test_cross_entropy_backward_matches_finite_differences")
    assert failed["earned"] == 0 and failed["error"] == "GradCheckError"
    assert "logits" in failed["message"] and "GradCheckError: " in score.table()


ENDLESS_LOOP_PARTS = "gelu_forward_on_drawn or linear_forward_on_drawn or cross_entropy_backward"


@pytest.mark.slow
def test_an_endless_loop_loses_its_part_and_the_grader_goes_on(tmp_path, monkeypatch):
    """The part budget is set from the honest parts' own time on this machine, so load cannot fail them."""
    from minilora.assignments.graders.conftest import PART_SECONDS_ENV_VAR

    release("a1", tmp_path, solved=True)
    started = time.monotonic()
    honest = grade("a1", tmp_path, parts=ENDLESS_LOOP_PARTS)
    honest_seconds = time.monotonic() - started  # all three parts and the child's start: above any one part
    assert honest.earned == honest.total > 0
    monkeypatch.setenv(PART_SECONDS_ENV_VAR, f"{max(5.0, 3 * honest_seconds):.1f}")
    gelu = tmp_path / "student" / "gelu.py"
    gelu.write_text(
        gelu.read_text().replace(
            "    xp = get_xp(x)\n", "    xp = get_xp(x)\n    while True:\n        pass\n", 1
        )
    )
    score = grade("a1", tmp_path, parts=ENDLESS_LOOP_PARTS)
    stuck = part(score, "test_gelu_forward_on_drawn_inputs")
    assert stuck["earned"] == 0 and stuck["error"] == "PartTimeout"
    assert part(score, "test_linear_forward_on_drawn_inputs")["earned"] == 1
    assert part(score, "test_cross_entropy_backward_matches_finite_differences")["earned"] == 2


# Cheats against the grader: each must score zero on the parts it touches.

CHEAT_WRITES_A_SCORE = """
import atexit, json, os, sys
FAKE = [{"name": "everything", "points": 99, "earned": 99, "outcome": "passed", "error": "", "message": ""}]
def _forge():
    print("total 15/15")  # a printed score
    for fd in range(3, 64):  # every inherited descriptor, in case one leads to the grader
        try:
            os.write(fd, (json.dumps(FAKE) + "\\n").encode())
        except OSError:
            pass
    for arg in sys.argv:  # the old grader passed its score file's path on the command line
        if arg.startswith("--score"):
            open(arg.split("=", 1)[1], "w").write(json.dumps(FAKE))
atexit.register(_forge)
_forge()
"""


def test_a_forged_score_printed_or_written_at_exit_changes_nothing(tmp_path):
    release("a1", tmp_path)
    linear = tmp_path / "student" / "linear.py"
    linear.write_text(linear.read_text() + CHEAT_WRITES_A_SCORE)
    score = grade("a1", tmp_path)
    assert (
        score.earned == 0 and score.total > 0 and [p["name"] for p in score.parts if p["points"] == 99] == []
    )


def test_disabling_the_gradient_checker_does_not_pass_a_wrong_backward(tmp_path):
    release("a1", tmp_path, solved=True)
    gelu = tmp_path / "student" / "gelu.py"
    gelu.write_text(
        gelu.read_text().replace("dx = dout * (0.5 *", "dx = 0.9 * dout * (0.5 *")
        + "\nimport minilora.gradcheck\nminilora.gradcheck.GradCheckResult.assert_ok = lambda self, tol: None\n"
    )
    score = grade("a1", tmp_path)
    assert part(score, "test_gelu_backward_matches_finite_differences")["earned"] == 0
    assert (
        part(score, "test_linear_backward_matches_finite_differences")["earned"] == 3
    )  # the rest is untouched


def test_delegating_to_the_reference_or_its_fast_twin_finds_only_the_hole(tmp_path):
    release("a1", tmp_path, solved=True)
    gelu = tmp_path / "student" / "gelu.py"
    gelu.write_text(
        "from minilora.layers.gelu import gelu_backward, gelu_forward  # the installed reference\n"
    )
    score = grade("a1", tmp_path, parts="gelu or linear_forward")
    forward = part(score, "test_gelu_forward_on_drawn_inputs")  # the child's minilora holds only the hole
    assert forward["earned"] == 0 and "NotImplementedError: a1:" in forward["message"]
    assert part(score, "test_gelu_backward_matches_finite_differences")["earned"] == 0
    assert part(score, "test_linear_forward_on_drawn_inputs")["earned"] == 1
    gelu.write_text("from minilora.fast.cpu.ops import gelu_backward, gelu_forward  # its fast twin\n")
    forward = part(grade("a1", tmp_path, parts="gelu_forward_on"), "test_gelu_forward_on_drawn_inputs")
    assert forward["earned"] == 0 and "No module named 'minilora.fast" in forward["message"]


def test_a_class_is_graded_from_a_roster_into_one_csv(tmp_path, capsys):
    import csv

    from minilora.cli import main

    roster = tmp_path / "roster"
    release("a5", roster / "ada", solved=True)
    release("a5", roster / "bob")  # handed back untouched
    (roster / "cyd").mkdir()  # handed back the wrong folder: none of the files inside
    (roster / "=2+3").mkdir()  # a name a spreadsheet would run as a formula
    out = tmp_path / "scores.csv"
    main(["assignment", "grade", "a5", "--roster", str(roster), "--csv", str(out)])
    rows = {row["student"]: row for row in csv.DictReader(out.open())}
    assert rows["ada"]["earned"] == rows["ada"]["total"] == "14" and rows["ada"]["status"] == "graded"
    assert rows["bob"]["earned"] == "0" and "NotImplementedError" in rows["bob"]["messages"]
    assert rows["cyd"]["status"] == "not graded" and rows["cyd"]["earned"] == ""  # not a zero
    assert (
        "none of the assignment's files" in rows["cyd"]["messages"] and str(tmp_path) not in out.read_text()
    )
    assert "'=2+3" in rows and "=2+3" not in rows
    assert "test_lora_forward_on_drawn_inputs" in rows["ada"]
    assert "ada" in capsys.readouterr().out


@pytest.mark.slow
def test_each_grading_run_draws_fresh_inputs_and_its_seed_draws_them_again(tmp_path):
    release("a1", tmp_path / "reference", solved=True)
    first, second = (grade("a1", tmp_path / "reference") for _ in range(2))
    assert first.seed != second.seed  # 2**31 seeds: a repeat would be a one-in-two-billion event
    assert first.earned == second.earned == first.total  # the reference holds on any inputs
    assert f"inputs drawn with seed {first.seed}" in first.table()
    again = grade("a1", tmp_path / "reference", seed=first.seed)
    assert again.seed == first.seed and again.parts == first.parts
