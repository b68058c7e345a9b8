"""Making a release: student copies of an assignment's files, with its holes opened, and a notebook.

A hole is the code between ``# BEGIN SOLUTION aN: hint`` and ``# END SOLUTION``. In the student
copy of assignment aN, each of aN's holes becomes ``raise NotImplementedError("aN: hint")``; the
holes of other assignments keep their reference code (markers removed), and relative imports point
at the installed minilora, so everything outside the holes is the reference. ``solved=True`` keeps
every hole's code: the reference in the release's own layout, which must score full marks.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

from ..version import __version__
from .catalog import get_assignment
from .sandbox import first_line

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # minilora/
STUDENT_DIR = "student"
RELEASE_RECORD = "release.json"  # which assignment, from which minilora version, solved or not
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


def hole_functions(assignment_id: str) -> list[str]:
    """The names of the functions that hold the assignment's holes (the grader guards them in the child)."""
    names = []
    for relative in get_assignment(assignment_id).sources:
        source = (PACKAGE_DIR / relative).read_text()
        lines = [
            number
            for number, line in enumerate(source.split("\n"), start=1)
            if (match := BEGIN.match(line)) and match.group(2) == assignment_id
        ]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(node.lineno < line <= node.end_lineno for line in lines):
                    names.append(node.name)
    return sorted(set(names))


def module_name(relative_path: str) -> str:
    return Path(relative_path).stem


def release(assignment_id: str, out_dir, solved: bool = False, force: bool = False) -> Path:
    """Write <out>/student/<file>.py for each of the assignment's files, <out>/<id>.ipynb and <out>/release.json.

    A folder that already holds a student/ with files is refused unless ``force``: it may be a
    student's work.
    """
    assignment = get_assignment(assignment_id)
    out_dir = Path(out_dir)
    student = out_dir / STUDENT_DIR
    if student.is_dir() and any(student.iterdir()) and not force:
        raise FileExistsError(
            f"{student} already holds files (perhaps a student's work): choose another --out, or pass "
            "--force to overwrite them"
        )
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
    record = {
        "assignment": assignment_id,
        "minilora_version": __version__,
        "solved": solved,
        "files": [Path(relative).name for relative in assignment.sources],
    }
    (out_dir / RELEASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
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


class StudentImportError(ImportError):
    """A student's file does not import; the message names the file and the first line of the error."""


class StudentModules:
    """The modules of a release's student/ folder by file stem, each imported when first asked for.

    Importing one file at a time keeps the others gradable: a syntax error in gelu.py costs the GELU
    parts only. The modules get unique names (``student_<stem>``), so they never shadow minilora's.
    """

    def __init__(self, release_dir):
        self.folder = student_folder(release_dir)
        self._modules, self._errors = {}, {}

    def __getitem__(self, stem: str):
        if stem in self._errors:
            raise self._errors[stem]
        if stem not in self._modules:
            path = self.folder / f"{stem}.py"
            if not path.is_file():
                raise StudentImportError(f"{path} is missing: hand back every file of student/")
            try:
                self._modules[stem] = _import_file(path, f"student_{stem}")
            except Exception as err:  # a student's file may raise anything while it imports
                self._errors[stem] = StudentImportError(
                    f"student/{stem}.py does not import: {type(err).__name__}: {first_line(str(err))}"
                )
                raise self._errors[stem] from err
        return self._modules[stem]

    def __iter__(self):
        return iter(sorted(path.stem for path in self.folder.glob("*.py")))


def student_folder(release_dir) -> Path:
    """The student/ folder of a release, or a clear error when the path is not a release."""
    folder = Path(release_dir) / STUDENT_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no {STUDENT_DIR}/ folder in {release_dir}: pass the release folder that holds {STUDENT_DIR}/ "
            "(the one `minilora assignment release` wrote), not the student/ folder itself"
        )
    return folder


def load_student(release_dir) -> StudentModules:
    """The student's modules of a release, by file stem: ``load_student('.')['gelu']``."""
    return StudentModules(release_dir)


def _import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
