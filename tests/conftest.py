"""The test markers (registered in pyproject.toml) and the one GPU check behind ``gpu``.

``gpu``: needs CuPy and a visible GPU; elsewhere the test is skipped, with the reason.
``slow``: takes more than about 10 s on two CPU cores (the notebooks' runs, the grading runs, every test
that reads the SmolLM2-135M file, fetched on first use); ``pytest -m "not slow"`` is the quick lane.
``notebooks``: executes a notebook in a Jupyter kernel (needs the notebooks extra).
"""

import pytest


def why_no_gpu() -> str | None:
    """Why CuPy cannot run here, or None where it sees a GPU."""
    try:
        import cupy
    except ImportError:
        return "needs CuPy: pip install -e '.[cuda12]' (or '.[cuda13]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CuPy installed, but no driver or device
        return f"needs a GPU: CuPy sees none ({err})"
    return None if count > 0 else "needs a GPU: none visible"


def pytest_collection_modifyitems(items):
    """Skip every ``gpu`` test, with the reason, where CuPy sees no GPU (the check runs once)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    reason = why_no_gpu() if gpu_tests else None
    if reason:
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason=reason))
