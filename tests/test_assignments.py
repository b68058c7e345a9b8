"""The assignment pipeline, both directions: the reference gets full marks, a blank release zero,
and every planted bug loses points on a numeric check."""

import pytest

from minilora.assignments.catalog import ASSIGNMENTS
from minilora.assignments.pipeline import planted_bugs, problems, verify
from minilora.assignments.release import release, student_copy


@pytest.mark.parametrize("assignment_id", sorted(ASSIGNMENTS))
def test_reference_scores_full_marks_blank_scores_zero_and_planted_bugs_lose_points(assignment_id):
    scores = verify(assignment_id)
    for name, score in scores.items():
        print(f"{assignment_id} {name}: {score.earned}/{score.total}")
    assert len(planted_bugs(assignment_id)) >= 2
    assert problems(assignment_id, scores) == []


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
