"""A regular (non-editable) install carries the shipped base model and corpora.

The wheel is built offline from a copy of the files a source distribution holds, then unpacked
and imported from another directory, where no data/ of the checkout can be found by accident.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from minilora.io.data import SHIPPED_CORPORA

REPOSITORY = Path(__file__).resolve().parents[1]
SOURCE_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCE_FILES:
        shutil.copy2(REPOSITORY / name, source / name)
    shutil.copytree(
        REPOSITORY / "minilora", source / "minilora", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPOSITORY / "data", source / "data")
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    completed = subprocess.run(
        [*command, "--quiet", "--wheel-dir", str(out), str(source)], capture_output=True
    )
    assert completed.returncode == 0, completed.stderr.decode()
    (built,) = out.glob("minilora-*.whl")
    return built


def test_wheel_holds_the_shipped_base_and_every_corpus_split(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"minilora/_data/{name}.{split}.txt.xz" for name in SHIPPED_CORPORA for split in ("train", "val")
    }
    expected |= {"minilora/_data/shakespeare_base.safetensors"}
    assert expected <= names, sorted(expected - names)
    assert (REPOSITORY / "data" / "shakespeare_base.safetensors").stat().st_size == (
        zipfile.ZipFile(wheel).getinfo("minilora/_data/shakespeare_base.safetensors").file_size
    )


def test_unpacked_wheel_finds_its_own_base_and_corpora_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    program = (
        "import minilora as ml; from minilora.io.data import DATA_DIR; "
        "assert ml.SHIPPED_BASE.is_file(), ml.SHIPPED_BASE; "
        "print(DATA_DIR); print(len(ml.load_corpus('shakespeare_folio').val))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", program],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site)},
    )
    assert completed.returncode == 0, completed.stderr
    data_dir, val_bytes = completed.stdout.split()
    assert Path(data_dir) == site / "minilora" / "_data"
    assert int(val_bytes) == 359_285  # data/README.md's size of shakespeare_folio.val


def test_the_command_line_imports_without_any_extra():
    blocked = ("regex", "gguf", "nbformat", "jupytext", "nbclient", "cupy", "torch", "pytest")
    program = (
        f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); import minilora.cli, minilora.lab.demo"
    )
    completed = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
