"""Every Python snippet in README.md works on its own, as a reader pastes it.

Each block is checked for names it uses but never defines (ruff's F821, the `NameError: np` kind),
and each block that runs in seconds is run in a fresh namespace from an empty directory. A block that
trains for minutes is listed in SLOW with the reason, and skipped where it would run.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SLOW = {"ml.fit(": "fine-tunes 100 steps of 8 x 256 bytes: minutes on two CPU cores"}


def python_snippets() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of README.md."""
    text = README.read_text()
    return [
        (text[: match.start()].count("\n") + 1, match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    ]


def snippet_params() -> list:
    params = []
    for line, code in python_snippets():
        reasons = [reason for marker, reason in SLOW.items() if marker in code]
        marks = [pytest.mark.skip(reason=f"README line {line} {reasons[0]}")] if reasons else []
        params.append(pytest.param(code, id=f"line{line}", marks=marks))
    return params


def test_readme_has_python_snippets():
    assert len(python_snippets()) >= 3


@pytest.mark.parametrize("line, code", python_snippets(), ids=lambda value: str(value)[:12])
def test_readme_snippet_uses_no_undefined_name(line, code):
    ruff = [sys.executable, "-m", "ruff"] if shutil.which("ruff") is None else [shutil.which("ruff")]
    completed = subprocess.run(
        [*ruff, "check", "--no-cache", "--isolated", "--select", "F821", "--stdin-filename", "snippet.py", "-"],
        input=code, capture_output=True, text=True,
    )  # fmt: skip
    if "No module named ruff" in completed.stderr:
        pytest.skip("ruff is not installed (the dev extra)")
    assert completed.returncode == 0, f"README line {line}:\n{completed.stdout}"


@pytest.mark.parametrize("code", snippet_params())
def test_readme_snippet_runs_on_its_own(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a snippet that writes a file writes it here
    exec(compile(code, "README.md snippet", "exec"), {"__name__": "readme_snippet"})
