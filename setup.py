"""One build step beyond pyproject.toml: the shipped base model and corpora go into the wheel.

data/ at the top of the repository is their one source (data/README.md says how each file is made).
A wheel has no data/ beside the package, so ``build_py`` copies the shipped files into the build's
``minilora/_data/``, and ``minilora.io.data`` reads them there once installed. Nothing is copied into
the source tree, and an editable install (``pip install -e .``) copies nothing: it reads data/ in place.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE = Path(__file__).parent / "data"
CORPORA = (
    "shakespeare_modern",
    "shakespeare_folio",
    "kjv",
    "devils_dictionary",
)  # io/data.py's SHIPPED_CORPORA
SHIPPED_FILES = (
    *(f"{name}.{split}.txt.xz" for name in CORPORA for split in ("train", "val")),
    "shakespeare_base.safetensors",  # the base model, float16
    "shakespeare_base.json",  # its readable metadata
)
PACKAGE_DATA_DIR = Path("minilora") / "_data"  # inside the built package; see minilora/io/data.py


class build_py_with_shipped_data(build_py):
    """setuptools' build_py, then the shipped files of data/ copied into the build's minilora/_data/."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / PACKAGE_DATA_DIR
        target.mkdir(parents=True, exist_ok=True)
        missing = [name for name in SHIPPED_FILES if not (SOURCE / name).is_file()]
        if missing:
            raise FileNotFoundError(f"shipped data files missing from {SOURCE}: {', '.join(missing)}")
        for name in SHIPPED_FILES:
            shutil.copyfile(SOURCE / name, target / name)


setup(cmdclass={"build_py": build_py_with_shipped_data})
