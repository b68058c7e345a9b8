"""The handouts: what each assignment asks, as markdown (handouts/aN.md) and as the release's notebook.

A handout states the learning goals, the math to derive (as a task, never its answer), the shapes,
the pitfalls, the points per part, a time estimate and a few written questions. Its ```python blocks
are the notebook's code cells: a setup cell, then a small local check after each hole (a finite-
difference check of the student's own function, on small inputs of its own, not the grader's).

The points table sits between two marker lines and is generated from the grader's
``@pytest.mark.points`` marks (read with ``ast``, so nothing of the grader is run): a release always
writes the grader's points, and a test checks that the committed handout holds the same table.
``python -m minilora.assignments.handout`` rewrites the tables after a grader's points change.

handouts/aN_solutions.md holds the worked derivations and the answers to the written questions, for
TAs: only a solved release (``release --solved``) carries it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .catalog import ASSIGNMENTS, get_assignment

HANDOUTS_DIR = Path(__file__).resolve().parent / "handouts"
GRADERS_DIR = Path(__file__).resolve().parent / "graders"
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
    get_assignment(assignment_id)
    return HANDOUTS_DIR / f"{assignment_id}_solutions.md"


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


def write_handouts() -> list[Path]:
    """Rewrite every handout's points table from its grader; returns the files that changed."""
    changed = []
    for assignment_id in ASSIGNMENTS:
        path = handout_path(assignment_id)
        if path.is_file() and path.read_text() != (text := handout_text(assignment_id)):
            path.write_text(text)
            changed.append(path)
    return changed


if __name__ == "__main__":
    for path in write_handouts():
        print(f"updated {path.name}")
