"""The tree as its own index: the README has a row per folder, and each package's docstring lists its files.

README.md's "What is inside" is a table with one row per folder, whose first cell names the folder in
backticks (`minilora/fast/cuda/`). Every package folder under minilora/ (a directory with an
``__init__.py``) must have a row, and every row must name a folder that exists. Each package's
``__init__`` docstring gives its reading order, so it must name every module file of the folder
(``layer.py``) and every subpackage (``kernels/``). Everything is read as text or with ``ast``:
nothing is imported. The last test runs the same checkers on a planted toy tree, so that the others
cannot pass vacuously.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "## What is inside"
FOLDER_CELL = re.compile(r"`([^`]+/)`")  # a folder named in backticks, with its trailing slash


def package_folders(root: Path) -> list[str]:
    """Every package folder under ``root/minilora`` (one with an ``__init__.py``), as ``minilora/x/y/``."""
    return sorted(
        f"{init.parent.relative_to(root).as_posix()}/" for init in (root / "minilora").rglob("__init__.py")
    )


def section_lines(readme: str, heading: str = SECTION) -> list[str]:
    """The lines of ``readme`` after ``heading`` and before the next heading of the same or a higher level."""
    lines = readme.splitlines()
    start = lines.index(heading) + 1
    level = heading.split(" ")[0]
    for end in range(start, len(lines)):
        hashes = lines[end].split(" ")[0]
        if hashes and set(hashes) == {"#"} and len(hashes) <= len(level):
            return lines[start:end]
    return lines[start:]


def table_folders(readme: str) -> list[str]:
    """The folder each table row of the "What is inside" section names in its first cell (rows that name one)."""
    folders = []
    for line in section_lines(readme):
        if not line.startswith("|"):
            continue
        first_cell = line.strip("|").split("|")[0]
        named = FOLDER_CELL.search(first_cell)
        if named:
            folders.append(named.group(1))
    return folders


def folders_without_row(root: Path) -> list[str]:
    """Package folders under ``root`` that README.md's "What is inside" table has no row for."""
    rows = set(table_folders((root / "README.md").read_text()))
    return [folder for folder in package_folders(root) if folder not in rows]


def rows_without_folder(root: Path) -> list[str]:
    """Folders named by a row of the "What is inside" table that do not exist under ``root``."""
    return [
        folder for folder in table_folders((root / "README.md").read_text()) if not (root / folder).is_dir()
    ]


def package_entries(package: Path) -> list[str]:
    """What a package's reading order must name: its module files (``x.py``) and subpackages (``x/``)."""
    modules = [path.name for path in package.glob("*.py") if path.name != "__init__.py"]
    subpackages = [f"{path.parent.name}/" for path in package.glob("*/__init__.py")]
    return sorted(modules + subpackages)


def unlisted_entries(root: Path) -> dict[str, list[str]]:
    """For each package under ``root/minilora``, the entries its ``__init__`` docstring leaves out (empty: none)."""
    missing = {}
    for folder in package_folders(root):
        package = root / folder
        docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        named = set(re.findall(r"[\w.]+/?", docstring))
        left_out = [entry for entry in package_entries(package) if entry not in named]
        if left_out:
            missing[folder] = left_out
    return missing


def test_the_tree_has_the_packages_this_test_expects():
    folders = package_folders(REPO)
    assert {"minilora/", "minilora/layers/", "minilora/fast/cuda/kernels/", "minilora/training/"} <= set(
        folders
    )


def test_every_package_folder_has_a_row_in_the_readme():
    assert folders_without_row(REPO) == []


def test_every_row_names_a_folder_that_exists():
    rows = table_folders((REPO / "README.md").read_text())
    assert {"notebooks/", "tests/", "data/", "docs/"} <= set(rows)
    assert rows_without_folder(REPO) == []


def test_every_row_is_one_folder_once():
    rows = table_folders((REPO / "README.md").read_text())
    assert len(rows) == len(set(rows)), sorted(row for row in rows if rows.count(row) > 1)


def test_every_package_docstring_names_its_modules_and_subpackages():
    assert unlisted_entries(REPO) == {}


def test_the_checkers_report_a_planted_missing_row_and_unlisted_module(tmp_path):
    package = tmp_path / "minilora"
    (package / "layers").mkdir(parents=True)
    (package / "ghost").mkdir()
    (package / "__init__.py").write_text(
        '"""Toy.\n\n    model.py  the model\n    layers/   the layers\n    ghost/    not in the README\n"""\n'
    )
    (package / "model.py").write_text('"""The model."""\n')
    (package / "layers" / "__init__.py").write_text('"""Layers.\n\n    linear.py  y = x W + b\n"""\n')
    (package / "layers" / "linear.py").write_text('"""Linear."""\n')
    (package / "layers" / "gelu.py").write_text('"""GELU, unlisted."""\n')
    (package / "ghost" / "__init__.py").write_text('"""A package the README forgot."""\n')
    (tmp_path / "README.md").write_text(
        "# toy\n\n## What is inside\n\n| folder | part | what it holds |\n| --- | --- | --- |\n"
        "| `minilora/` | reference | the model |\n| `minilora/layers/` | reference | the layers |\n"
        "| `minilora/gone/` | reference | a folder since removed |\n\n"
        "## Tests\n\n| `minilora/ghost/` | a row outside the section does not count |\n"
    )
    assert folders_without_row(tmp_path) == ["minilora/ghost/"]
    assert rows_without_folder(tmp_path) == ["minilora/gone/"]
    assert unlisted_entries(tmp_path) == {"minilora/layers/": ["gelu.py"]}
