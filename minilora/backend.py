"""One array backend for the CPU (NumPy) and the GPU (CuPy).

Every layer in minilora is written once, against the NumPy API. CuPy implements the same API on a
CUDA GPU, so the same code runs on either device. The rules that make this work:

- Layer code never imports numpy or cupy to compute: it asks its inputs for their module with
  ``xp = get_xp(x)`` and calls ``xp.matmul``, ``xp.exp``, ... on that.
- Arrays cross between host and device in exactly two functions: ``to_device`` and ``to_numpy``.
  Printing, plotting and ``np.testing`` only ever see NumPy arrays.
- Random initial weights and training batches are drawn on the host from a seeded
  ``numpy.random.Generator`` and then moved, so CPU and GPU runs start from identical numbers.
  Dropout masks are drawn on the active device (``device_rng``), since they are made every step.

The device is chosen explicitly: ``--device cpu|cuda`` on the command line, a ``device=`` argument in
the Python API, and the environment variable ``MINILORA_DEVICE`` as the default for both.
"""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import contextmanager
from types import ModuleType

import numpy as np

DEVICES = ("cpu", "cuda")
DEVICE_ENV_VAR = "MINILORA_DEVICE"


class BackendError(RuntimeError):
    """The requested device cannot be used; the message says how to fix it."""


def resolve_device(device: str | None = None) -> str:
    """The device to use: the argument if given, else $MINILORA_DEVICE, else "cpu"."""
    chosen = device if device is not None else os.environ.get(DEVICE_ENV_VAR, "cpu")
    chosen = chosen.strip().lower()
    if chosen not in DEVICES:
        source = "device argument" if device is not None else f"${DEVICE_ENV_VAR}"
        raise BackendError(f"unknown device {chosen!r} (from the {source}); choose one of {DEVICES}")
    return chosen


def _import_cupy() -> ModuleType:
    """Import CuPy and check that a GPU is visible, or explain how to get there."""
    try:
        import cupy
    except ImportError as err:
        raise BackendError(
            "device 'cuda' needs CuPy, which is not installed. Install the wheel that matches your "
            "CUDA driver: pip install -e '.[cuda12]' or pip install -e '.[cuda13]' "
            f"(import error: {err})"
        ) from err
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CuPy raises its own CUDARuntimeError subclasses here
        raise BackendError(
            f"device 'cuda': CuPy is installed but cannot reach a GPU ({err}). Check nvidia-smi, the "
            "driver version against the cupy-cuda12x/13x wheel you installed, and CUDA_VISIBLE_DEVICES; "
            "or run with --device cpu"
        ) from err
    if n_gpus == 0:
        raise BackendError(
            "device 'cuda': no GPU is visible (check CUDA_VISIBLE_DEVICES), or use --device cpu"
        )
    return cupy


def get_backend(device: str | None = None) -> ModuleType:
    """The array module (numpy or cupy) for a device name; see resolve_device for the default."""
    return np if resolve_device(device) == "cpu" else _import_cupy()


def get_xp(x) -> ModuleType:
    """The array module an array belongs to, so layer code follows its inputs onto the device."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


FLOAT_DTYPES = ("float32", "float64", "bfloat16")


def float_dtype(name) -> np.dtype:
    """The NumPy dtype for a float dtype's name; "bfloat16" comes from ml_dtypes (which CuPy 14 uses)."""
    name = getattr(name, "name", name)
    if name not in FLOAT_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {FLOAT_DTYPES}")
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as err:
            raise BackendError("dtype bfloat16 needs the ml_dtypes package: pip install ml_dtypes") from err
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def device_of(x) -> str:
    """'cuda' for a CuPy array, 'cpu' for anything else."""
    return "cuda" if get_xp(x) is not np else "cpu"


def to_device(x, device: str | None = None):
    """Move a host array to a device (a no-op for 'cpu' and for arrays already there)."""
    xp = get_backend(device)
    return xp.asarray(x)


def to_numpy(x) -> np.ndarray:
    """Move an array of either backend to a host NumPy array (a no-op for NumPy arrays)."""
    if get_xp(x) is np:
        return np.asarray(x)
    return x.get()


def all_finite(params: dict) -> bool:
    """True if no parameter holds a NaN or an infinity (checked before a checkpoint is written)."""
    return all(bool(get_xp(value).isfinite(value).all()) for value in params.values())


def weights_fingerprint(params: dict) -> str:
    """SHA-256 over a model's weights: name, shape and float32 bytes of each, in sorted name order.

    Two models share a fingerprint exactly when they hold the same numbers (as float32), whatever
    the device, so an adapter can check that it meets the base it was trained on.
    """
    digest = hashlib.sha256()
    for name in sorted(params):
        value = np.ascontiguousarray(to_numpy(params[name]), dtype=np.float32)
        digest.update(f"{name}:{value.shape}".encode())
        digest.update(value.tobytes())
    return "sha256:" + digest.hexdigest()


class MatmulLog:
    """The matrix products made while a ``count_matmuls()`` block is active: operand and output shapes."""

    def __init__(self):
        self.products = []  # (shape of a, shape of b, shape of a @ b)

    def record(self, a, b, out) -> None:
        self.products.append((tuple(a.shape), tuple(b.shape), tuple(out.shape)))

    @property
    def flops(self) -> int:
        """2 m n k per product (a multiply and an add per term), summed over every batch of a stacked matmul."""
        return sum(2 * math.prod(out) * a[-1] for a, _, out in self.products)

    def outputs_of_shape(self, shape) -> int:
        return sum(1 for _, _, out in self.products if out == tuple(shape))


_matmul_log: MatmulLog | None = None  # set only inside count_matmuls(), for tests and teaching


@contextmanager
def count_matmuls():
    """Record every product made through ``matmul`` inside the block: ``with count_matmuls() as log:``.

    This is how the tests prove that a frozen weight never gets a weight-gradient product.
    """
    global _matmul_log
    outer, _matmul_log = _matmul_log, MatmulLog()
    try:
        yield _matmul_log
    finally:
        _matmul_log = outer


_device_matmuls = {}  # array module name -> the product that replaces its own matmul (register_matmul)


def register_matmul(module_name: str, product) -> None:
    """Route every ``matmul`` of ``module_name``'s arrays (e.g. "cupy") through ``product(a, b)``.

    The seam through which a fast path brings its own matrix products (minilora.fast.cuda registers
    cuBLAS calls that a CUDA graph can record); nothing in this module knows what is registered.
    """
    _device_matmuls[module_name] = product


def matmul(a, b):
    """a @ b on the arrays' own backend; every layer multiplies matrices through this one function."""
    xp = get_xp(a)
    out = _device_matmuls.get(xp.__name__, xp.matmul)(a, b)
    if _matmul_log is not None:
        _matmul_log.record(a, b, out)
    return out


def scatter_add(target, indices, values) -> None:
    """target[indices] += values, in place, adding every repeated index.

    Plain ``target[indices] += values`` keeps only one of several updates to the same row (the
    embedding backward sees every token that occurs twice in a batch), so it is wrong here.
    """
    get_xp(target).add.at(target, indices, values)  # NumPy's and CuPy's unbuffered in-place add


def host_rng(*key: int) -> np.random.Generator:
    """A NumPy generator seeded by a tuple of integers, e.g. host_rng(seed, stream, step).

    Seeding from (seed, step) rather than carrying one generator through training makes every
    step's randomness a pure function of its number: resuming at step k needs no saved RNG state.
    """
    return np.random.default_rng(list(key))


def device_rng(xp: ModuleType, *key: int):
    """A generator on the device of ``xp``, seeded by a tuple of integers (see host_rng).

    Used for per-step randomness made on the device, such as dropout masks. CuPy's generator takes
    one integer seed, which we derive from the key with NumPy's SeedSequence.
    """
    if xp is np:
        return host_rng(*key)
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return xp.random.default_rng(seed)


def synchronize(xp: ModuleType) -> None:
    """Wait for queued GPU work to finish (GPU calls return early); a no-op on the CPU."""
    if xp is not np:
        xp.cuda.Device().synchronize()  # every stream: the captured training step runs on its own
