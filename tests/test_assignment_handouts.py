"""The handouts: each assignment's task as markdown and notebook, with points read from its grader,
local checks that pass on the reference and stop at a blank hole, and student copies that give
neither a hole's code nor its derivation away (the solved copy keeps both)."""

import re
from pathlib import Path

import pytest

from minilora.assignments import handout
from minilora.assignments.catalog import ANSWERS_FILE, ASSIGNMENTS, later_than
from minilora.assignments.grading import grade
from minilora.assignments.handout import (
    HANDOUTS_DIR,
    POINTS_BEGIN,
    POINTS_END,
    check_cells,
    grader_parts,
    handout_path,
    handout_text,
    notebook_cells,
    part_title,
    solutions_path,
    written_questions,
)
from minilora.assignments.release import (
    BEGIN,
    DEFAULT_POLICY,
    END,
    PACKAGE_DIR,
    POLICY_FILE,
    derivation_blocks,
    hole_functions,
    release,
    solutions_elsewhere,
    student_copy,
)

REPO = Path(__file__).resolve().parent.parent
WITH_HANDOUTS = sorted(a for a in ASSIGNMENTS if handout_path(a).is_file())
SECTIONS = [
    "## Learning goals",
    "## Shapes",
    "## Pitfalls",
    "## Points",
    "## Written questions",
    "## Deliverables",
]


def package_data() -> list[str]:
    """Every file of the source tree that pyproject's package-data puts into a wheel."""
    table = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    files = []
    for package, patterns in re.findall(r'^"([\w.]+)" = \[(.*)\]', table, re.M):
        folder = REPO.joinpath(*package.split("."))
        files += [path for pattern in re.findall(r'"([^"]+)"', patterns) for path in folder.glob(pattern)]
    return files


def test_every_assignment_has_a_handout_and_worked_solutions_that_no_wheel_carries():
    assert set(WITH_HANDOUTS) == set(ASSIGNMENTS)
    for assignment_id in ASSIGNMENTS:
        path = solutions_path(assignment_id)
        assert path.is_file(), f"{assignment_id} has a handout but no solutions"
        assert PACKAGE_DIR not in path.parents, "the worked solutions must not be package data"
    shipped = package_data()
    assert handout_path("a1") in shipped and DEFAULT_POLICY in shipped  # the wheels hold them
    assert [path for path in shipped if "solution" in path.name.lower()] == []
    for path in HANDOUTS_DIR.iterdir():  # every file there is a handout
        assert path.name.removesuffix(".md") in WITH_HANDOUTS, path.name


def table_rows(text: str) -> dict:
    """{part title: points} of the handout's points table, as the markdown says."""
    table = text.split(POINTS_BEGIN)[1].split(POINTS_END)[0]
    rows = [re.match(r"^\| (.+) \| \**(\d+)\** \|$", line) for line in table.strip().split("\n")[2:]]
    assert all(rows), table
    return {row.group(1): int(row.group(2)) for row in rows}


@pytest.mark.parametrize("assignment_id", WITH_HANDOUTS)
def test_the_handouts_points_are_the_graders_points(assignment_id, tmp_path):
    committed = handout_path(assignment_id).read_text()
    assert committed == handout_text(assignment_id), (
        f"{assignment_id}.md's points table is stale: run `python -m minilora.assignments.handout`"
    )
    rows = table_rows(committed)
    total = rows.pop("**total**")
    # what the grader really awards, part by part: grade a blank release and read the points
    release(assignment_id, tmp_path)
    awarded = {part_title(part["name"]): part["points"] for part in grade(assignment_id, tmp_path).parts}
    assert rows == awarded == {part_title(name): points for name, points in grader_parts(assignment_id)}
    assert total == sum(awarded.values())


@pytest.mark.parametrize("assignment_id", WITH_HANDOUTS)
def test_a_handout_has_goals_shapes_pitfalls_points_time_questions_and_a_check_after_each_hole(assignment_id):
    text = handout_path(assignment_id).read_text()
    assert text.startswith(f"# {assignment_id}: {ASSIGNMENTS[assignment_id].title}\n")
    for heading in SECTIONS:
        assert f"\n{heading}\n" in text, f"{assignment_id}.md lacks {heading}"
    assert re.search(r"\*\*Time:\*\* about \d", text), "a time estimate"
    assert "**Derive.**" in text, "the math to derive, as a task"
    questions = re.findall(r"^\d\. ", text.split("## Written questions")[1], flags=re.MULTILINE)
    assert 2 <= len(questions) <= 3
    shapes = text.split("## Shapes")[1].split("\n## ")[0]
    assert shapes.count("\n| `") >= 5, "a shapes table"
    cells = notebook_cells(text)
    # after each hole's description comes a code cell that runs the function of that hole
    checks = [source for kind, source in cells if kind == "code"][1:]
    for function in hole_functions(assignment_id):
        assert any(re.search(rf"\b{function}\b", source) for source in checks), f"no check uses {function}"


def run_cells(cells, folder, monkeypatch):
    """Run the handout's code cells as the notebook would, in the release folder; each cell's outcome."""
    monkeypatch.chdir(folder)
    namespace, outcomes = {}, []
    for source in cells:
        try:
            exec(compile(source, "<cell>", "exec"), namespace)
            outcomes.append(None)
        except Exception as err:  # a check that fails or a hole that is still open
            outcomes.append(err)
    return outcomes


@pytest.mark.parametrize("assignment_id", WITH_HANDOUTS)
def test_the_check_cells_pass_on_the_reference_and_each_stops_at_a_blank_hole(
    assignment_id, tmp_path, monkeypatch
):
    cells = check_cells(assignment_id)
    assert len(cells) >= 1 + len(hole_functions(assignment_id))
    release(assignment_id, tmp_path / "solved", solved=True)
    assert run_cells(cells, tmp_path / "solved", monkeypatch) == [None] * len(cells)
    release(assignment_id, tmp_path / "blank")
    setup, *checks = run_cells(cells, tmp_path / "blank", monkeypatch)
    assert setup is None
    assert [type(err).__name__ for err in checks] == ["NotImplementedError"] * len(checks)
    assert all(str(err).startswith(f"{assignment_id}: ") for err in checks)


def marked_lines(source: str, tag: str) -> tuple[list, list]:
    """The code lines of one assignment's holes in a source text, and the lines of its Derivation blocks."""
    holes, inside = [], False
    for line in source.split("\n"):
        begin = BEGIN.match(line)
        if begin:
            inside = begin.group(2) == tag
        elif END.match(line):
            inside = False
        elif inside:
            code = line.split("  #")[0].strip()
            if len(code) >= 6 and re.search(r"[A-Za-z_]", code) and not code.startswith("#"):
                holes.append(code)
    derivations = [line.strip() for block in derivation_blocks(source, tag) for line in block if line.strip()]
    return holes, derivations


def key_lines(assignment_id: str, tags=None) -> tuple[list, list]:
    """The code lines of the holes of ``tags`` (default: the assignment's own) in the assignment's
    files, and the lines of their Derivation blocks."""
    holes, derivations = [], []
    for tag in tags or [assignment_id]:
        for relative in ASSIGNMENTS[assignment_id].sources:
            found = marked_lines((PACKAGE_DIR / relative).read_text(), tag)
            holes, derivations = holes + found[0], derivations + found[1]
    return holes, derivations


def released_text(folder: Path, student_only: bool = False) -> str:
    paths = sorted((folder / "student").glob("*.py")) if student_only else sorted(folder.rglob("*.*"))
    return "\n".join(path.read_text() for path in paths if path.suffix in (".py", ".md", ".ipynb"))


@pytest.mark.parametrize("assignment_id", WITH_HANDOUTS)
def test_the_student_copy_gives_away_no_hole_and_no_derivation_and_the_solved_copy_keeps_them(
    assignment_id, tmp_path
):
    holes, derivations = key_lines(assignment_id)
    assert len(holes) >= 2 * len(hole_functions(assignment_id)) - 1, holes
    assert derivations, f"{assignment_id}'s sources have no Derivation ({assignment_id}) block"
    release(assignment_id, tmp_path / "blank")
    blank = released_text(tmp_path / "blank")  # the student files, the handout and the notebook
    assert [line for line in holes if line in blank] == []
    assert [line for line in derivations if line in blank] == []
    assert f"Derivation ({assignment_id}):" not in blank
    assert not (tmp_path / "blank" / f"{assignment_id}_solutions.md").exists()
    release(assignment_id, tmp_path / "solved", solved=True)
    assert solutions_elsewhere(assignment_id) is None  # from a source tree, the release copies them
    solved = released_text(tmp_path / "solved", student_only=True)
    assert [line for line in holes if line not in solved] == []
    assert [line for line in derivations if line not in solved] == []
    solutions = tmp_path / "solved" / f"{assignment_id}_solutions.md"
    assert solutions.read_text() == solutions_path(assignment_id).read_text()
    # a student release written over a solved one with --force takes the answers away again
    release(assignment_id, tmp_path / "solved", force=True)
    assert not solutions.exists()


@pytest.mark.parametrize("assignment_id", WITH_HANDOUTS)
def test_a_blank_release_carries_no_later_assignments_answer(assignment_id, tmp_path):
    holes, derivations = key_lines(assignment_id, later_than(assignment_id))
    release(assignment_id, tmp_path)
    blank = released_text(tmp_path)
    assert [line for line in holes if line in blank] == []
    assert [line for line in derivations if line in blank] == []
    assert [later for later in later_than(assignment_id) if f"Derivation ({later}):" in blank] == []
    if assignment_id == "a5":  # lora/layer.py holds a7's rsLoRA hole
        assert holes and 'raise NotImplementedError("a7: ' in (tmp_path / "student" / "layer.py").read_text()


def with_later_holes() -> list[str]:
    return [a for a in ASSIGNMENTS if any(key_lines(a, later_than(a)))]


@pytest.mark.parametrize("assignment_id", with_later_holes())
def test_a_blank_release_with_only_its_own_holes_filled_scores_full_marks(assignment_id, tmp_path):
    """A later hole left open in aN's files must lie off every path aN's grader runs."""
    release(assignment_id, tmp_path)
    for relative in ASSIGNMENTS[assignment_id].sources:
        package = ".".join(["minilora", *Path(relative).parent.parts])
        filled = student_copy((PACKAGE_DIR / relative).read_text(), later_than(assignment_id), package)
        (tmp_path / "student" / Path(relative).name).write_text(filled)
    score = grade(assignment_id, tmp_path)
    assert score.earned == score.total, score.table()


@pytest.mark.parametrize("assignment_id", WITH_HANDOUTS)
def test_a_release_writes_the_answers_template_with_each_questions_points_and_the_policy(
    assignment_id, tmp_path
):
    text = handout_path(assignment_id).read_text()
    questions = written_questions(text)
    assert len(questions) == len(re.findall(r"^\d\. ", text.split("## Written questions")[1], re.M))
    assert all(points > 0 for _, points, _ in questions), "every written question carries its points"
    release(assignment_id, tmp_path)
    answers = (tmp_path / ANSWERS_FILE).read_text()
    total = sum(points for _, points, _ in questions)
    assert answers.startswith(f"# {assignment_id}: written answers ({total} points")
    for number, points, question in questions:
        assert f"## Question {number} ({points} points)\n\n> {question}\n" in answers
    deliverables = text.split("\n## Deliverables\n")[1]
    assert ANSWERS_FILE in deliverables and f"{total} in all" in deliverables
    for relative in ASSIGNMENTS[assignment_id].sources:
        assert f"`student/{Path(relative).name}`" in deliverables, relative
    assert ANSWERS_FILE in ASSIGNMENTS[assignment_id].optional
    assert (tmp_path / POLICY_FILE).read_text() == DEFAULT_POLICY.read_text()
    course = tmp_path / "course-policy.md"
    course.write_text("# Our course's policy\n")
    release(assignment_id, tmp_path / "again", policy=course)
    assert (tmp_path / "again" / POLICY_FILE).read_text() == "# Our course's policy\n"


def test_a_solved_release_without_the_source_trees_solutions_says_where_they_are(tmp_path, monkeypatch):
    monkeypatch.setattr(handout, "SOLUTIONS_DIR", tmp_path / "no-such-folder")  # as in an installed wheel
    release("a1", tmp_path / "solved", solved=True)
    assert not (tmp_path / "solved" / "a1_solutions.md").exists()
    line = solutions_elsewhere("a1")
    assert "\n" not in line and "docs/assignments/solutions/a1.md" in line


def test_the_instructors_guide_counts_parts_points_and_bugs_from_the_graders():
    guide = handout.GUIDE.read_text()
    assert guide == handout.guide_text(), (
        "docs/instructors.md is stale: run `python -m minilora.assignments.handout`"
    )
    assert "Seven assignments," in guide and len(ASSIGNMENTS) == 7
    assert "## Isolation levels" in guide


def test_a_derivation_block_ends_at_the_first_line_no_deeper_than_its_header():
    from minilora.assignments.release import student_copy

    source = (
        'def f(x):\n    """Gradient of f.   x: (N,) -> (N,).\n\n    Derivation (a1):\n        df = 2 x\n\n'
        "            (worked out)\n\n    Returns dx, shaped like x.\n\n    Derivation (a2):\n"
        '        kept: another assignment\'s\n    """\n    return x\n\n\n'
        'def g(x):\n    """Gradient of g.\n\n    Derivation (a1):\n        dg = 3\n    """\n    return x\n'
    )
    student = student_copy(source, "a1", "minilora")
    assert "df = 2 x" not in student and "(worked out)" not in student and "dg = 3" not in student
    assert "Derivation (a1)" not in student
    assert ".\n\n    Returns dx, shaped like x.\n\n    Derivation (a2):\n        kept" in student
    assert '    """Gradient of g."""\n    return x' in student  # no empty lines left behind
    assert student_copy(source, "a1", "minilora", solved=True) == source
    assert student_copy(source, "a2", "minilora").count("Derivation (a1):") == 2


@pytest.mark.parametrize("assignment_id", WITH_HANDOUTS)
def test_the_notebook_is_the_handout_with_the_holes_listed_and_the_grader_last(assignment_id, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    release(assignment_id, tmp_path)
    notebook = nbformat.read(tmp_path / f"{assignment_id}.ipynb", as_version=4)
    assert (tmp_path / f"{assignment_id}.md").read_text() == handout_text(assignment_id)
    assert notebook.cells[0].source.startswith(f"# {assignment_id}: {ASSIGNMENTS[assignment_id].title}")
    assert notebook.cells[1].source.startswith("## The holes")
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    assert code[:-1] == check_cells(assignment_id)
    assert f"grade({assignment_id!r}, '.')" in code[-1]
    assert any(
        cell.source.startswith("## Points") and "| **total** |" in cell.source for cell in notebook.cells
    )


@pytest.mark.notebooks
def test_a_solved_release_notebook_runs_top_to_bottom_in_a_kernel_and_its_grader_gives_full_marks(tmp_path):
    import json
    import sys

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path / "kernels" / "this-python"  # a kernel of this very interpreter
    kernels.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernels / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "this", "language": "python"})
    )
    specs = KernelSpecManager(kernel_dirs=[str(kernels.parent)], ensure_native_kernel=False)
    release("a5", tmp_path / "a5", solved=True)
    notebook = nbformat.read(tmp_path / "a5" / "a5.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        km=KernelManager(kernel_name="this-python", kernel_spec_manager=specs),
        timeout=300,
        resources={"metadata": {"path": str(tmp_path / "a5")}},
    )
    client.execute()  # raises CellExecutionError if any cell fails
    printed = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    points = sum(points for _, points in grader_parts("a5"))
    assert re.search(rf"^total\s+{points}/{points}$", printed, flags=re.MULTILINE), printed
