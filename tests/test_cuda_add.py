"""The vectorised sums on the GPU (minilora.fast.cuda.kernels.add) and the linear layer that uses them.

Against NumPy's float64 sum of the very same numbers: float32 and float64 exactly as the type rounds
one sum (float64 to 0, float32 to 1 ulp), bf16 within one bf16 rounding (2^-8 relative). Each case
runs both kernels' forms: 16-byte vectors, and one element at a time (an odd length, or a view whose
address is not 16-byte aligned). These tests run only where CuPy and a GPU are present.
"""

import numpy as np
import pytest

from minilora import layers as ref
from minilora.backend import float_dtype, host_rng, to_device, to_numpy
from minilora.fast.cuda import linear, use_cublas
from minilora.fast.cuda.kernels.add import add_bias_, residual_add

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

use_cublas()
TOLERANCE = {"float64": 0.0, "float32": 2**-23, "bfloat16": 2**-8}


def numbers(shape, dtype, seed):
    """Random numbers in ``dtype`` on the GPU, and the same numbers in float64 on the host."""
    host = host_rng(seed).standard_normal(shape).astype(float_dtype(dtype) if dtype == "bfloat16" else dtype)
    return to_device(host, "cuda"), host.astype(np.float64)


def assert_rounded_once(got, want, dtype):
    got = to_numpy(got).astype(np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=TOLERANCE[dtype], atol=0)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shape", [(4, 16, 64), (3, 5, 7)])  # vectors; an odd length, one element a thread
def test_residual_add_is_the_sum_rounded_once(dtype, shape):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    (x, x64), (y, y64) = numbers(shape, dtype, 1), numbers(shape, dtype, 2)
    assert_rounded_once(residual_add(x, y), x64 + y64, dtype)
    offset = cupy.empty(x.size + 1, dtype=x.dtype)[1:].reshape(shape)  # not 16-byte aligned
    offset[...] = x
    assert_rounded_once(residual_add(offset, y), x64 + y64, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("C", [64, 13])
def test_bias_is_added_to_every_row_in_place(dtype, C):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    (y, y64), (b, b64) = numbers((3, 7, C), dtype, 3), numbers((C,), dtype, 4)
    before = y.data.ptr
    add_bias_(y, b)
    assert y.data.ptr == before
    assert_rounded_once(y, y64 + b64, dtype)


@pytest.mark.parametrize("with_bias", [True, False])
def test_the_gpus_linear_layer_equals_the_reference_in_float64(with_bias):
    (x, x64), (W, W64), (b, b64) = (
        numbers(s, "float64", i) for i, s in enumerate([(2, 5, 8), (8, 24), (24,)])
    )
    y, cache = linear.linear_forward(x, W, b if with_bias else None)
    want, _ = ref.linear_forward(x64, W64, b64 if with_bias else None)
    np.testing.assert_allclose(to_numpy(y), want, rtol=1e-13, atol=1e-13)
    assert cache.has_bias == with_bias and cache.x is x and cache.W is W
