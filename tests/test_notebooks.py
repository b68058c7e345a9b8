"""The notebooks run top to bottom from their jupytext twins, and the committed .ipynb match the twins.

Each notebook's checks are its assert cells: executing it fresh (nbclient, a kernel of this very
interpreter) fails if any cell raises. Outputs are not compared, since timings and float rounding
differ between machines; the committed notebooks must have the same cells as their .py twins and
carry the outputs of a complete run.
"""

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the notebooks extra: pip install -e '.[notebooks]'")
jupytext = pytest.importorskip("jupytext", reason="needs the notebooks extra: pip install -e '.[notebooks]'")
pytest.importorskip("nbclient", reason="needs the notebooks extra: pip install -e '.[notebooks]'")
pytest.importorskip("ipykernel", reason="needs the notebooks extra: pip install -e '.[notebooks]'")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOK_TIMEOUT = 300  # seconds for a whole notebook; each takes under a minute on two idle CPU cores
EXPECTED = [
    "01_lora_from_scratch",
    "02_transformer_step_by_step",
    "03_parameter_savings",
    "04_loss_vs_rank",
    "05_merging_and_latency",
    "06_what_the_adapter_learned",
    "07_the_same_code_on_a_gpu",
    "08_flash_attention",
    "09_a_real_llm",
]


def load_build():
    """notebooks/build.py, the one command that regenerates the notebooks, imported as a module."""
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build()
SOURCES = build.notebook_sources()


def cells(nb):
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def test_every_notebook_has_a_py_twin_and_an_executed_ipynb():
    assert [source.stem for source in SOURCES] == EXPECTED
    missing = [
        source.with_suffix(".ipynb").name for source in SOURCES if not source.with_suffix(".ipynb").exists()
    ]
    assert not missing, f"run `python notebooks/build.py` to create {missing}"


@pytest.mark.parametrize("source", SOURCES, ids=lambda source: source.stem)
def test_committed_notebook_matches_its_py_twin_and_is_executed(source):
    committed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    assert cells(committed) == cells(jupytext.read(source)), (
        f"{source.with_suffix('.ipynb').name} differs from {source.name}: "
        f"run `python notebooks/build.py {source.name[:2]}`"
    )
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code), (
        "committed without running every cell"
    )
    errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
    assert not errors, f"committed with an error: {errors[0].ename}: {errors[0].evalue}"


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=lambda source: source.stem)
def test_notebook_runs_top_to_bottom(source):
    nb, seconds = build.execute(source, timeout=NOTEBOOK_TIMEOUT)  # raises CellExecutionError if a cell fails
    assert all(cell.execution_count is not None for cell in nb.cells if cell.cell_type == "code")
    print(f"{source.name}: {seconds:.1f} s")
