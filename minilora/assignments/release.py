"""Making a release: student copies of an assignment's files, with its holes opened, and a notebook.

A hole is the code between ``# BEGIN SOLUTION aN: hint`` and ``# END SOLUTION``. In the student
copy of assignment aN, each of aN's holes becomes ``raise NotImplementedError("aN: hint")``; the
holes of other assignments keep their reference code (markers removed), and relative imports point
at the installed minilora, so everything outside the holes is the reference. ``solved=True`` keeps
every hole's code: the reference in the release's own layout, which must score full marks.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from .catalog import get_assignment

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # minilora/
STUDENT_DIR = "student"
BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION (a\d+): (.*)$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
RELATIVE_IMPORT = re.compile(r"^(\s*from )(\.+)(\w[\w.]*)?( import .*)$")


def absolute_imports(line: str, package: str) -> str:
    """``from ..backend import x`` in package minilora.layers -> ``from minilora.backend import x``."""
    match = RELATIVE_IMPORT.match(line)
    if not match:
        return line
    head, dots, name, tail = match.groups()
    parts = package.split(".")
    base = parts[: len(parts) - (len(dots) - 1)]
    return f"{head}{'.'.join(base + ([name] if name else []))}{tail}"


def student_copy(source: str, assignment_id: str, package: str, solved: bool = False) -> str:
    """The text of a student's copy of one library file (see the module docstring)."""
    out, skipping = [], False
    for line in source.split("\n"):
        begin = BEGIN.match(line)
        if begin:
            indent, tag, hint = begin.groups()
            skipping = tag == assignment_id and not solved
            if skipping:
                out.append(f'{indent}raise NotImplementedError("{tag}: {hint}")')
            continue
        if END.match(line):
            skipping = False
            continue
        if not skipping:
            out.append(absolute_imports(line, package))
    return "\n".join(out)


def module_name(relative_path: str) -> str:
    return Path(relative_path).stem


def release(assignment_id: str, out_dir, solved: bool = False) -> Path:
    """Write <out>/student/<file>.py for each of the assignment's files, and <out>/<id>.ipynb."""
    assignment = get_assignment(assignment_id)
    out_dir = Path(out_dir)
    student = out_dir / STUDENT_DIR
    student.mkdir(parents=True, exist_ok=True)
    holes = []
    for relative in assignment.sources:
        path = PACKAGE_DIR / relative
        package = ".".join(["minilora", *Path(relative).parent.parts])
        source = path.read_text()
        markers = [BEGIN.match(line) for line in source.split("\n")]
        holes += [(relative, m.group(3)) for m in markers if m and m.group(2) == assignment_id]
        header = (
            f"# {assignment.title} ({assignment_id}): your copy of minilora/{relative}.\n"
            f"# Fill in every hole that raises NotImplementedError; everything else is the reference.\n"
        )
        (student / Path(relative).name).write_text(
            header + student_copy(source, assignment_id, package, solved)
        )
    if not holes:
        raise ValueError(f"assignment {assignment_id} has no holes in {assignment.sources}")
    write_notebook(assignment, holes, out_dir / f"{assignment_id}.ipynb")
    return out_dir


def write_notebook(assignment, holes, path: Path) -> None:
    """The release's notebook (nbformat, of the notebooks extra, is imported only here: grading needs none)."""
    import nbformat

    listing = "\n".join(f"- `student/{Path(relative).name}`: {hint}" for relative, hint in holes)
    cells = [
        nbformat.v4.new_markdown_cell(
            f"# {assignment.title}\n\nThis assignment teaches {assignment.teaches}.\n\n"
            f"Open the files in `student/` and fill in each hole (it raises `NotImplementedError` with a hint):\n\n"
            f"{listing}\n\nEverything else in those files is minilora's reference code. Run the cells below to "
            f"check your work as you go; the last one runs the grader."
        ),
        nbformat.v4.new_code_cell(
            "from minilora.assignments.release import load_student\n\n"
            "student = load_student('.')  # your modules, by file name\nsorted(student)"
        ),
        nbformat.v4.new_code_cell(
            f"from minilora.assignments.grading import grade\n\nprint(grade({assignment.id!r}, '.').table())"
        ),
    ]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)


def load_student(release_dir) -> dict:
    """Import every module of a release's student/ folder under a unique name: {file stem: module}."""
    modules = {}
    for path in sorted((Path(release_dir) / STUDENT_DIR).glob("*.py")):
        name = f"student_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules[path.stem] = module
    return modules
