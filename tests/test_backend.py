"""The NumPy/CuPy shim: device choice, clear errors, host/device moves, scatter-add."""

import importlib.util
import sys
import types

import numpy as np
import pytest

from minilora.backend import (
    BackendError,
    device_rng,
    get_backend,
    get_xp,
    host_rng,
    resolve_device,
    scatter_add,
    to_device,
    to_numpy,
)

HAS_CUPY = importlib.util.find_spec("cupy") is not None


def test_device_defaults_to_cpu(monkeypatch):
    monkeypatch.delenv("MINILORA_DEVICE", raising=False)
    assert resolve_device() == "cpu"
    assert get_backend() is np


def test_environment_variable_sets_the_default_and_the_argument_wins(monkeypatch):
    monkeypatch.setenv("MINILORA_DEVICE", "cuda")
    assert resolve_device() == "cuda"
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("device, source", [("tpu", "device argument"), (None, "MINILORA_DEVICE")])
def test_unknown_device_is_named_with_its_source(monkeypatch, device, source):
    monkeypatch.setenv("MINILORA_DEVICE", "gpu0")
    with pytest.raises(BackendError, match=rf"unknown device '(tpu|gpu0)'.*{source}.*cpu.*cuda"):
        resolve_device(device)


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed here")
def test_cuda_without_cupy_says_how_to_install_it():
    with pytest.raises(BackendError, match=r"needs CuPy.*pip install -e '\.\[cuda12\]'"):
        get_backend("cuda")


def test_numpy_arrays_stay_on_the_host():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert get_xp(x) is np
    assert to_device(x, "cpu") is x
    assert to_numpy(x) is x


def test_scatter_add_adds_every_repeated_index():
    target = np.zeros((4, 2), dtype=np.float64)
    indices = np.array([1, 3, 1, 1])
    values = np.arange(8, dtype=np.float64).reshape(4, 2)
    scatter_add(target, indices, values)
    expected = np.zeros((4, 2))
    for i, row in zip(indices, values):  # the slow, obviously right reference
        expected[i] += row
    np.testing.assert_array_equal(target, expected)


def test_plain_fancy_index_add_would_drop_repeats():
    # Why scatter_add exists: `a[idx] += v` keeps one update per repeated index.
    target = np.zeros(2)
    target[np.array([0, 0, 0])] += 1.0
    assert target[0] == 1.0


def test_seeded_generators_depend_on_every_key_component():
    draw = lambda *key: host_rng(*key).random(3)  # noqa: E731
    np.testing.assert_array_equal(draw(1, 0, 5), draw(1, 0, 5))
    assert not np.array_equal(draw(1, 0, 5), draw(1, 0, 6))
    assert not np.array_equal(draw(1, 0, 5), draw(1, 1, 5))
    np.testing.assert_array_equal(device_rng(np, 1, 0, 5).random(3), draw(1, 0, 5))


def test_cuda_with_cupy_but_no_gpu_says_what_to_check(monkeypatch):
    class FakeRuntime:
        @staticmethod
        def getDeviceCount():
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake_cupy = types.ModuleType("cupy")
    fake_cupy.cuda = types.SimpleNamespace(runtime=FakeRuntime)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    with pytest.raises(BackendError, match=r"cannot reach a GPU.*nvidia-smi.*--device cpu"):
        get_backend("cuda")


def test_float_dtypes_by_name_and_one_line_for_an_unknown_one():
    from minilora.backend import float_dtype

    assert float_dtype("float32") == np.float32 and float_dtype(np.dtype("float64")) == np.float64
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        float_dtype("float16")


def test_bfloat16_comes_from_ml_dtypes_or_says_how_to_get_it():
    from minilora.backend import BackendError, float_dtype

    if importlib.util.find_spec("ml_dtypes") is None:
        with pytest.raises(BackendError, match="pip install ml_dtypes"):
            float_dtype("bfloat16")
    else:
        bf16 = float_dtype("bfloat16")
        assert bf16.name == "bfloat16" and bf16.itemsize == 2
        assert float(np.array(1 + 2**-9, dtype=np.float64).astype(bf16)) == 1.0  # 7 stored mantissa bits
