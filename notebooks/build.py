"""Regenerate the executed notebooks from their jupytext twins.

    python notebooks/build.py            # every notebook
    python notebooks/build.py 03 05      # only those whose names start with 03 or 05

Each ``NN_name.py`` (jupytext percent format) is the source. It is read with jupytext, run top to
bottom by nbclient in a fresh kernel of this very interpreter (so it sees the minilora installed
here, whatever Jupyter kernels happen to be registered), and written beside it as ``NN_name.ipynb``
with its outputs and plots. tests/test_notebooks.py runs the same ``execute`` on every notebook.

The kernel uses one BLAS thread unless the environment says otherwise: on a busy two-core machine
two BLAS threads wait for each other and a notebook can take five times longer; one is steady.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
KERNEL = "minilora-python"
KERNELSPEC = {
    "name": "python3",
    "display_name": "Python 3 (ipykernel)",
    "language": "python",
}  # for each .ipynb
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def notebook_sources() -> list[Path]:
    """The jupytext twins, in order: notebooks/NN_name.py."""
    return sorted(HERE.glob("[0-9][0-9]_*.py"))


def execute(source: Path, timeout: float = 600) -> tuple[nbformat.NotebookNode, float]:
    """Run the notebook of ``source`` in a fresh kernel; returns it with its outputs, and the seconds taken.

    Raises nbclient's CellExecutionError if any cell raises (a failed assert cell included), and
    TimeoutError if the whole notebook takes longer than ``timeout`` seconds.
    """
    nb = jupytext.read(source)
    with tempfile.TemporaryDirectory() as kernels:
        write_kernel_spec(Path(kernels) / KERNEL)  # argv: [sys.executable, "-m", "ipykernel_launcher", ...]
        specs = KernelSpecManager(kernel_dirs=[kernels], ensure_native_kernel=False)
        km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
        client = NotebookClient(
            nb, km=km, timeout=timeout, record_timing=False, resources={"metadata": {"path": str(HERE)}}
        )  # cells run in notebooks/
        env = {**{name: "1" for name in THREAD_VARIABLES}, **os.environ}  # one BLAS thread unless set already
        started = time.perf_counter()
        asyncio.run(asyncio.wait_for(client.async_execute(env=env), timeout))
        seconds = time.perf_counter() - started
    nb.metadata["kernelspec"] = KERNELSPEC
    return nb, seconds


def main(prefixes: list[str]) -> None:
    for source in notebook_sources():
        if prefixes and not any(source.name.startswith(prefix) for prefix in prefixes):
            continue
        nb, seconds = execute(source)
        nbformat.write(nb, source.with_suffix(".ipynb"))
        print(f"{source.with_suffix('.ipynb').name}: executed in {seconds:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
