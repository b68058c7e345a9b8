"""The handouts: what each assignment asks, as markdown (handouts/aN.md) and as the release's notebook.

A handout states the learning goals, the math to derive (as a task, never its answer), the shapes,
the pitfalls, the points per part, a time estimate and a few written questions. Its ```python blocks
are the notebook's code cells: a setup cell, then a small local check after each hole (a finite-
difference check of the student's own function, on small inputs of its own, not the grader's).

The points table sits between two marker lines and is generated from the grader's
``@pytest.mark.points`` marks (read with ``ast``, so nothing of the grader is run): a release always
writes the grader's points, and a test checks that the committed handout holds the same table.
``python -m minilora.assignments.handout`` rewrites the tables after a grader's points change.

The worked derivations and the answers to the written questions, for TAs, are not package data: no
installed minilora (a student's included) carries them. They live in the source repository, in
docs/assignments/solutions/aN.md beside the package, and only a solved release (``release --solved``)
made from a source tree copies them.

Each written question carries its points, ``1. **(2 points)** ...``: the release writes them into
``answers.md``, the template a student fills in and hands back beside student/.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .catalog import ASSIGNMENTS, get_assignment

HANDOUTS_DIR = Path(__file__).resolve().parent / "handouts"
GRADERS_DIR = Path(__file__).resolve().parent / "graders"
SOLUTIONS_DIR = Path(__file__).resolve().parents[2] / "docs" / "assignments" / "solutions"  # source tree only
SOLUTIONS_IN_REPOSITORY = "docs/assignments/solutions"  # where they are, for a message from an installed copy
GUIDE = SOLUTIONS_DIR.parent.parent / "instructors.md"  # docs/instructors.md, in a source tree only
SUMMARY_BEGIN = (
    "<!-- BEGIN SUMMARY: generated from the graders and bugs/ by `python -m minilora.assignments.handout` -->"
)
SUMMARY_END = "<!-- END SUMMARY -->"
QUESTION = re.compile(r"^(\d+)\. \*\*\((\d+) points?\)\*\* (.*)$")
POINTS_BEGIN = "<!-- BEGIN POINTS: generated from the grader by `python -m minilora.assignments.handout` -->"
POINTS_END = "<!-- END POINTS -->"
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```\n?", re.DOTALL | re.MULTILINE)


def part_title(test_name: str) -> str:
    """``test_linear_forward_on_drawn_inputs`` -> ``linear forward on drawn inputs``."""
    return test_name.removeprefix("test_").replace("_", " ")


def grader_parts(assignment_id: str) -> list[tuple[str, int]]:
    """(test name, points) of every graded part, in the grader's order, read from its source."""
    get_assignment(assignment_id)
    tree = ast.parse((GRADERS_DIR / f"grade_{assignment_id}.py").read_text())
    parts = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call)
                    and isinstance(decorator.func, ast.Attribute)
                    and decorator.func.attr == "points"
                ):
                    parts.append((node.name, int(ast.literal_eval(decorator.args[0]))))
    return parts


def points_table(assignment_id: str) -> str:
    """The markdown table of the grader's parts and their points, with the total."""
    parts = grader_parts(assignment_id)
    rows = ["| part | points |", "| --- | ---: |"]
    rows += [f"| {part_title(name)} | {points} |" for name, points in parts]
    rows.append(f"| **total** | **{sum(points for _, points in parts)}** |")
    return "\n".join(rows)


def handout_path(assignment_id: str) -> Path:
    get_assignment(assignment_id)
    return HANDOUTS_DIR / f"{assignment_id}.md"


def solutions_path(assignment_id: str) -> Path:
    """The worked solutions beside the package's source tree (absent from an installed wheel)."""
    get_assignment(assignment_id)
    return SOLUTIONS_DIR / f"{assignment_id}.md"


def handout_text(assignment_id: str) -> str:
    """The handout with its points table (re)generated from the grader."""
    text = handout_path(assignment_id).read_text()
    if text.count(POINTS_BEGIN) != 1 or text.count(POINTS_END) != 1:
        raise ValueError(
            f"{handout_path(assignment_id).name} needs one points table between its marker lines"
        )
    head, rest = text.split(POINTS_BEGIN)
    _, tail = rest.split(POINTS_END)
    return f"{head}{POINTS_BEGIN}\n{points_table(assignment_id)}\n{POINTS_END}{tail}"


def written_questions(text: str) -> list[tuple[int, int, str]]:
    """(number, points, question) of each of a handout's written questions, its lines joined."""
    section = text.split("\n## Written questions\n")[1].split("\n## ")[0]
    questions = []
    for line in section.split("\n"):
        match = QUESTION.match(line)
        if match:
            questions.append([int(match.group(1)), int(match.group(2)), match.group(3)])
        elif questions and line.startswith("   ") and line.strip():
            questions[-1][2] += " " + line.strip()
    return [tuple(question) for question in questions]


def answers_template(assignment_id: str) -> str:
    """The ``answers.md`` a release writes: each written question with its points and room to answer."""
    questions = written_questions(handout_path(assignment_id).read_text())
    total = sum(points for _, points, _ in questions)
    lines = [
        f"# {assignment_id}: written answers ({total} points, graded by hand)",
        "",
        "Name:",
        "",
        "AI tools used, and for what (see policy.md):",
        "",
    ]
    for number, points, question in questions:
        lines += [f"## Question {number} ({points} points)", "", f"> {question}", "", "Your answer:", "", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def notebook_cells(text: str) -> list[tuple[str, str]]:
    """A handout as ("markdown" | "code", source) cells: each ```python block a code cell, each
    second-level section of the prose between them a markdown cell."""
    cells, position = [], 0
    for match in CODE_BLOCK.finditer(text):
        cells += _markdown_cells(text[position : match.start()])
        cells.append(("code", match.group(1).rstrip("\n")))
        position = match.end()
    return cells + _markdown_cells(text[position:])


def _markdown_cells(prose: str) -> list[tuple[str, str]]:
    sections = re.split(r"^(?=## )", prose, flags=re.MULTILINE)
    return [("markdown", section.strip("\n")) for section in sections if section.strip()]


def check_cells(assignment_id: str) -> list[str]:
    """The handout's code cells: the setup cell first, then the checks."""
    return [source for kind, source in notebook_cells(handout_text(assignment_id)) if kind == "code"]


def summary_table() -> str:
    """The instructor's guide's table: per assignment its graded parts, their points and its planted bugs,
    counted from the graders and bugs/ (so that no count in the guide goes stale)."""
    bugs_dir = GRADERS_DIR.parent / "bugs"
    rows = ["| assignment | graded parts | points | planted bugs |", "| --- | ---: | ---: | ---: |"]
    totals = [0, 0, 0]
    for assignment_id in ASSIGNMENTS:
        parts = grader_parts(assignment_id)
        counts = (
            len(parts),
            sum(points for _, points in parts),
            len(list(bugs_dir.glob(f"{assignment_id}_*.patch"))),
        )
        totals = [total + count for total, count in zip(totals, counts)]
        rows.append(f"| {assignment_id} | {counts[0]} | {counts[1]} | {counts[2]} |")
    rows.append(f"| **all {len(ASSIGNMENTS)}** | **{totals[0]}** | **{totals[1]}** | **{totals[2]}** |")
    return "\n".join(rows)


def guide_text() -> str:
    """docs/instructors.md with its summary table (re)generated."""
    text = GUIDE.read_text()
    head, rest = text.split(SUMMARY_BEGIN)
    _, tail = rest.split(SUMMARY_END)
    return f"{head}{SUMMARY_BEGIN}\n{summary_table()}\n{SUMMARY_END}{tail}"


def write_handouts() -> list[Path]:
    """Rewrite every handout's points table from its grader, and the guide's summary table in a source
    tree; returns the files that changed."""
    changed = []
    for assignment_id in ASSIGNMENTS:
        path = handout_path(assignment_id)
        if path.is_file() and path.read_text() != (text := handout_text(assignment_id)):
            path.write_text(text)
            changed.append(path)
    if GUIDE.is_file() and GUIDE.read_text() != (text := guide_text()):
        GUIDE.write_text(text)
        changed.append(GUIDE)
    return changed


if __name__ == "__main__":
    for path in write_handouts():
        print(f"updated {path.name}")
