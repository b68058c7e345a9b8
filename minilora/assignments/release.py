"""Making a release: student copies of an assignment's files, with its holes opened, and a notebook.

A hole is the code between ``# BEGIN SOLUTION aN: hint`` and ``# END SOLUTION``. In the student
copy of assignment aN, each of aN's holes becomes ``raise NotImplementedError("aN: hint")``, and so
does each hole of a later assignment (catalog order) in the same files: a7's answer must not ship in
a5's copy of lora/layer.py. Holes of earlier assignments keep their reference code (markers removed):
those are past due. Relative imports point at the installed minilora, so everything outside the holes
is the reference. A later hole is placed so that aN's graded paths never run through it: a blank aN
with only aN's holes filled scores full marks. ``solved=True`` keeps every hole's code: the reference
in the release's own layout, which must score full marks.

A docstring may also hold the derivation a hole asks for: a line ``Derivation (aN):`` and the
indented block under it (it ends at the first non-blank line indented no deeper than the header).
The student copy of aN leaves such blocks out, so a backward's formula never sits right above its
hole; the solved copy keeps them. A release also carries the handout (handouts/aN.md, see
handout.py), its notebook, ``answers.md`` (the written questions with their points, to fill in and
hand back) and ``policy.md`` (the honour code and AI-tool policy: templates/policy.md, or the
course's own); a solved release made from a source tree adds the worked solutions for TAs
(aN_solutions.md, from docs/assignments/solutions/aN.md: no installed minilora carries them).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

from ..version import __version__
from .catalog import ANSWERS_FILE, get_assignment, later_than
from .handout import (
    SOLUTIONS_IN_REPOSITORY,
    answers_template,
    handout_path,
    handout_text,
    notebook_cells,
    solutions_path,
)
from .sandbox import PACKAGE_DIR, STUDENT_DIR, first_line

RELEASE_RECORD = "release.json"  # which assignment, from which minilora version, solved or not
POLICY_FILE = "policy.md"  # the honour code and AI-tool policy, in every release
DEFAULT_POLICY = Path(__file__).resolve().parent / "templates" / "policy.md"
BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION (a\d+): (.*)$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
DERIVATION = re.compile(r"^(\s*)Derivation \((a\d+)\):\s*$")
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


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def derivation_blocks(source: str, assignment_id: str) -> list[list[str]]:
    """The ``Derivation (aN):`` blocks of one assignment in a source text: each its header and its lines."""
    blocks, lines = [], source.split("\n")
    for number, line in enumerate(lines):
        match = DERIVATION.match(line)
        if match and match.group(2) == assignment_id:
            end = number + 1
            while end < len(lines) and (
                not lines[end].strip() or indent_of(lines[end]) > len(match.group(1))
            ):
                end += 1
            while end > number + 1 and not lines[end - 1].strip():  # trailing blank lines are not the block's
                end -= 1
            blocks.append(lines[number:end])
    return blocks


def student_copy(source: str, assignment_id, package: str, solved: bool = False) -> str:
    """The text of a student's copy of one library file (see the module docstring).

    ``assignment_id`` is one id, or a collection of ids whose holes and derivations are all opened.
    """
    opened = {assignment_id} if isinstance(assignment_id, str) else set(assignment_id)
    out, skipping, derivation = [], False, None  # derivation: the indent of the block being left out
    for line in source.split("\n"):
        if derivation is not None:
            if not line.strip() or indent_of(line) > derivation:
                continue
            derivation = None
            if line.strip() == '"""' and out and not out[-1].strip():
                out.pop()  # the block ended its docstring: no blank line before the closing quotes
                if out[-1].lstrip().startswith('"""'):  # and what is left is a one-line docstring
                    out[-1] += '"""'
                    continue
        begin = BEGIN.match(line)
        if begin:
            indent, tag, hint = begin.groups()
            skipping = tag in opened and not solved
            if skipping:
                out.append(f'{indent}raise NotImplementedError("{tag}: {hint}")')
            continue
        if END.match(line):
            skipping = False
            continue
        block = DERIVATION.match(line)
        if block and block.group(2) in opened and not solved and not skipping:
            derivation = len(block.group(1))
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


def opened_by(assignment_id: str) -> set:
    """The assignments whose holes a blank release of this one opens: itself and every later one."""
    return {assignment_id, *later_than(assignment_id)}


def release(assignment_id: str, out_dir, solved: bool = False, force: bool = False, policy=None) -> Path:
    """Write <out>/student/<file>.py for each of the assignment's files, <out>/<id>.md (the handout),
    <out>/<id>.ipynb, <out>/answers.md, <out>/policy.md (``policy``, a file, or the default) and
    <out>/release.json; a solved release from a source tree adds <out>/<id>_solutions.md.

    A folder that already holds a student/ with files is refused unless ``force``: it may be a
    student's work (an answers.md there is kept unless ``force``, for the same reason).
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
        source = (PACKAGE_DIR / relative).read_text()
        markers = [BEGIN.match(line) for line in source.split("\n")]
        holes += [(relative, m.group(3)) for m in markers if m and m.group(2) == assignment_id]
        (student / Path(relative).name).write_text(student_file(assignment, relative, source, solved))
    if not holes:
        raise ValueError(f"assignment {assignment_id} has no holes in {assignment.sources}")
    handout = handout_path(assignment_id)
    text = handout_text(assignment_id) if handout.is_file() else None
    if text is not None:
        (out_dir / f"{assignment_id}.md").write_text(text)
        answers = out_dir / ANSWERS_FILE
        if force or not answers.exists():
            answers.write_text(answers_template(assignment_id))
    (out_dir / POLICY_FILE).write_text(Path(policy or DEFAULT_POLICY).read_text())
    solutions, copied = solutions_path(assignment_id), out_dir / solutions_name(assignment_id)
    if solved and solutions.is_file():
        copied.write_text(solutions.read_text())
    elif not solved:
        copied.unlink(missing_ok=True)  # a student release never carries the answers
    write_notebook(assignment, holes, out_dir / f"{assignment_id}.ipynb", text)
    record = {
        "assignment": assignment_id,
        "minilora_version": __version__,
        "solved": solved,
        "files": [Path(relative).name for relative in assignment.sources],
    }
    (out_dir / RELEASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def student_file(assignment, relative: str, source: str, solved: bool) -> str:
    """One student file: a header saying what to fill in, then the student copy of the library file."""
    package = ".".join(["minilora", *Path(relative).parent.parts])
    later = sorted(opened_by(assignment.id) - {assignment.id})
    header = (
        f"# {assignment.title} ({assignment.id}): your copy of minilora/{relative}.\n"
        f'# Fill in every hole that raises NotImplementedError("{assignment.id}: ..."); everything '
        "else is the reference.\n"
    )
    if not solved and any(tag in later for tag in re.findall(r"# BEGIN SOLUTION (a\d+):", source)):
        header += "# A hole of a later assignment stays open here: it is not part of this one.\n"
    return header + student_copy(source, opened_by(assignment.id), package, solved)


def solutions_name(assignment_id: str) -> str:
    """The worked solutions' name in a solved release."""
    return f"{assignment_id}_solutions.md"


def solutions_elsewhere(assignment_id: str) -> str | None:
    """One line saying where the worked solutions are when this minilora cannot copy them, else None."""
    if solutions_path(assignment_id).is_file():
        return None
    return (
        f"no worked solutions copied: an installed minilora carries none; they are "
        f"{SOLUTIONS_IN_REPOSITORY}/{assignment_id}.md in minilora's source repository"
    )


def write_notebook(assignment, holes, path: Path, handout: str | None = None) -> None:
    """The release's notebook: the handout's cells (its ```python blocks are the code cells), then a
    cell that runs the grader. Without a handout, a short task cell lists the holes.

    nbformat, of the notebooks extra, is imported only here: grading needs none.
    """
    import nbformat

    listing = "\n".join(f"- `student/{Path(relative).name}`: {hint}" for relative, hint in holes)
    if handout is None:
        cells = [
            nbformat.v4.new_markdown_cell(
                f"# {assignment.title}\n\nThis assignment teaches {assignment.teaches}.\n\n"
                f"Open the files in `student/` and fill in each hole (it raises `NotImplementedError` with a "
                f"hint):\n\n{listing}\n\nEverything else in those files is minilora's reference code. Run "
                f"the cells below to check your work as you go; the last one runs the grader."
            ),
            nbformat.v4.new_code_cell(
                "from minilora.assignments.release import load_student\n\n"
                "student = load_student('.')  # your modules, by file name\nsorted(student)"
            ),
        ]
    else:
        cells = [
            nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
            for kind, source in notebook_cells(handout)
        ]
        cells.insert(1, nbformat.v4.new_markdown_cell(f"## The holes\n\n{listing}"))
    cells.append(
        nbformat.v4.new_code_cell(
            f"from minilora.assignments.grading import grade\n\nprint(grade({assignment.id!r}, '.').table())"
        )
    )
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

    def loaded(self) -> list:
        """The modules imported so far."""
        return list(self._modules.values())


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
