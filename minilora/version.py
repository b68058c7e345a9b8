"""The version of minilora, in one place: the package, the checkpoints' provenance and pyproject.toml read it."""

__version__ = "0.3.0"
