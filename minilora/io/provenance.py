"""Where a result came from: package version, git commit, device, library versions, command line.

Stored in every checkpoint and results file, so that a number can be traced back to the code and
the machine that produced it.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..version import __version__

SOURCE = Path(__file__).resolve().parents[2]  # a checkout's root, or site-packages' parent once installed


def git_commit(source: Path = SOURCE) -> str | None:
    """The commit of the source checkout minilora runs from, with '-dirty' for local edits; None outside git.

    Only a checkout's own root counts: an installed copy may sit inside some other repository (a
    virtual environment in a clone), whose commit says nothing about the code that ran.
    """
    if not (source / ".git").exists():  # a folder, or a file in a worktree
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def provenance(device: str, seed: int | None = None) -> dict:
    return {
        "minilora_version": __version__,
        "git_commit": git_commit(),
        "device": device,
        "seed": seed,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "command": command_line(),
    }


def command_line() -> str:
    """The command as typed, the program's directory left out: it names a machine, not the run."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":  # python -m minilora (or -m minilora.cli)
        program = "minilora"
    return " ".join([program, *sys.argv[1:]])
