"""minilora's own cuBLAS calls (minilora.fast.cuda.blas) against NumPy in float64, and under CUDA graph capture.

Skipped without CuPy and a GPU. Every layout the layers make is covered: plain row-major operands,
transposed views (W.T, x.T), column slices of a wider array (q, k, v out of qkv), stacks of matrices
with equal batch shapes, and one weight broadcast over (B, T, C) inputs.
"""

import numpy as np
import pytest

from minilora.backend import matmul
from minilora.fast.cuda import blas as cuda_blas
from minilora.fast.cuda import use_cublas

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

RNG = np.random.default_rng(0)


def pair(shape_a, shape_b, dtype):
    return RNG.standard_normal(shape_a).astype(dtype), RNG.standard_normal(shape_b).astype(dtype)


def check(a_gpu, b_gpu, a_host, b_host):
    assert cuda_blas.supports(a_gpu, b_gpu)
    got = cuda_blas.matmul(a_gpu, b_gpu)
    want = np.matmul(a_host.astype(np.float64), b_host.astype(np.float64))
    assert got.shape == want.shape
    tol = 1e-12 if a_gpu.dtype == np.float64 else 1e-5
    err = np.abs(cupy.asnumpy(got) - want).max() / np.abs(want).max()
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "transpose_a, transpose_b", [(False, False), (True, False), (False, True), (True, True)]
)
def test_two_dimensional_products_in_every_layout(dtype, transpose_a, transpose_b):
    a, b = pair((37, 19), (19, 23), dtype)
    a_gpu = (
        cupy.asarray(a.T.copy()).T if transpose_a else cupy.asarray(a)
    )  # a column-major view when transposed
    b_gpu = cupy.asarray(b.T.copy()).T if transpose_b else cupy.asarray(b)
    check(a_gpu, b_gpu, a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_weight_broadcast_over_batch_and_time(dtype):
    x, W = pair((3, 5, 16), (16, 48), dtype)
    check(cupy.asarray(x), cupy.asarray(W), x, W)
    check(cupy.asarray(x), cupy.asarray(W.T.copy()).T, x, W)  # W.T of a (48, 16) array, as in dx = dout W^T


def test_the_weight_gradient_product_of_transposed_rows():
    x, dout = pair((2, 7, 16), (2, 7, 48), np.float32)
    xg, dg = cupy.asarray(x), cupy.asarray(dout)
    check(xg.reshape(-1, 16).T, dg.reshape(-1, 48), x.reshape(-1, 16).T, dout.reshape(-1, 48))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_per_head_products_on_strided_views_of_qkv(dtype):
    B, T, H, hs = 2, 9, 3, 4
    qkv = RNG.standard_normal((B, T, 3 * H * hs)).astype(dtype)
    views = qkv.reshape(B, T, 3, H, hs).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hs), no copy
    gviews = cupy.asarray(qkv).reshape(B, T, 3, H, hs).transpose(2, 0, 3, 1, 4)
    q, k, v = views
    gq, gk, gv = gviews
    check(gq, gk.swapaxes(-1, -2), q, k.swapaxes(-1, -2))  # q k^T
    att = RNG.standard_normal((B, H, T, T)).astype(dtype)
    check(cupy.asarray(att), gv, att, v)  # att v
    check(cupy.asarray(att).swapaxes(-1, -2), gq, att.swapaxes(-1, -2), q)  # att^T dy


def test_unsupported_operands_fall_back_to_cupy():
    a, v = cupy.ones((4, 3), dtype=np.float32), cupy.ones(3, dtype=np.float32)
    assert not cuda_blas.supports(a, v)  # a matrix times a vector
    assert not cuda_blas.supports(a, cupy.ones((3, 2), dtype=np.float64))  # mixed dtypes
    np.testing.assert_allclose(cupy.asnumpy(cuda_blas.product(a, v)), np.full(4, 3.0))


def test_use_cublas_routes_the_backend_matmul_through_our_handle(monkeypatch):
    calls = []
    monkeypatch.setattr(cuda_blas, "matmul", lambda a, b: calls.append(a.shape) or cupy.matmul(a, b))
    use_cublas()
    a, b = cupy.ones((4, 3), dtype=np.float32), cupy.ones((3, 2), dtype=np.float32)
    np.testing.assert_allclose(cupy.asnumpy(matmul(a, b)), np.full((4, 2), 3.0))
    assert calls == [(4, 3)]


def test_products_are_recorded_by_a_cuda_graph_and_replayed_on_new_inputs():
    a, b = pair((64, 32), (32, 48), np.float32)
    ga, gb = cupy.asarray(a), cupy.asarray(b)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        cuda_blas.matmul(ga, gb)  # warm-up outside the capture
        stream.begin_capture()
        out = cuda_blas.matmul(ga, gb) * 2.0
        graph = stream.end_capture()
        a2 = RNG.standard_normal(a.shape).astype(np.float32)
        ga.set(a2)
        graph.launch(stream)
        stream.synchronize()
    np.testing.assert_allclose(cupy.asnumpy(out), 2.0 * (a2.astype(np.float64) @ b), rtol=1e-5, atol=1e-4)
