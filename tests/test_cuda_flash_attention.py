"""The flash-attention CUDA kernels (minilora.fast.cuda.kernels.flash_attention) against float64 references.

Two references, neither of them the kernel: the NumPy flash attention of minilora.layers.flash_attention
(tiled online softmax, recomputing backward) and plain attention (minilora.layers.attention), both
in float64 on the host, on the very numbers the GPU was given. Dropout is compared with plain
attention under the same mask (the flash reference has none). Shapes include T = 1, T shorter than a
tile, T a multiple of the 64-wide tile and T one past it, and head sizes 16, 32, 64 and 128.

Error measure: ||got - want|| / ||want|| over the whole array.
    float32 (plain FMA arithmetic, no tensor cores): below 2e-5
    bfloat16 (tensor-core products, float32 accumulation; inputs rounded to bf16 before both sides
    see them): below 1e-2, the range bf16 operands give (P and dS are rounded to bf16 too)
These tests run only where CuPy and a GPU are present.
"""

import math

import numpy as np
import pytest

from minilora import layers as ref
from minilora.backend import device_rng, to_numpy
from minilora.fast.cuda.kernels import attention as fused_attention
from minilora.fast.cuda.kernels import flash_attention as flash
from minilora.fast.cuda.ops import CUDA_OPS
from minilora.layers.flash_attention import flash_attention_backward, flash_attention_forward

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

F32_TOL, BF16_TOL = 2e-5, 1e-2
SHAPES = [(2, 3, 1, 64), (2, 2, 37, 64), (1, 2, 64, 16), (2, 2, 65, 64), (1, 3, 200, 128), (1, 1, 130, 32)]


def rel_err(got, want) -> float:
    got, want = to_numpy(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def grads_err(gots, wants) -> float:
    """The largest error of dq, dk, dv, each relative to the norm of the whole gradient (dq, dk, dv).

    One scale for the three: with T = 1 (one key per query) dq and dk are exactly zero, and only
    rounding is left in them, which a norm of their own would divide by zero.
    """
    scale = math.sqrt(sum(np.linalg.norm(np.asarray(w, dtype=np.float64)) ** 2 for w in wants))
    errors = []
    for got, want in zip(gots, wants):
        got = to_numpy(got).astype(np.float64)
        assert got.shape == want.shape and np.all(np.isfinite(got))
        errors.append(float(np.linalg.norm(got - np.asarray(want, dtype=np.float64))) / scale)
    return max(errors)


def plain_attention(q, k, v, dout, mask=None):
    """Output and (dq, dk, dv) of plain attention in float64 (attention.py), for (B, H, T, hs) inputs."""
    B, H, T, hs = q.shape
    qkv = np.stack([q, k, v]).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * H * hs)  # (B, T, 3C)
    y, cache = ref.attention_forward(qkv, H, mask)
    dqkv = ref.attention_backward(ref.merge_heads(dout), cache)  # (B, T, 3C)
    grads = dqkv.reshape(B, T, 3, H, hs).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, hs)
    return y.reshape(B, T, H, hs).transpose(0, 2, 1, 3), grads


def random_inputs(shape, seed):
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal(shape) for _ in range(4))
    return 1.5 * q, 1.5 * k, v, dout


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_forward_and_backward_match_both_references(shape):
    q, k, v, dout = (x.astype(np.float32).astype(np.float64) for x in random_inputs(shape, sum(shape)))
    gq, gk, gv, gdout = (cupy.asarray(x, dtype=cupy.float32) for x in (q, k, v, dout))
    out, lse = flash.flash_attention(gq, gk, gv)
    dq, dk, dv = flash.flash_attention_backward(gdout, gq, gk, gv, out, lse)
    want_out, cache = flash_attention_forward(q, k, v)  # the NumPy flash reference, float64
    want_grads = flash_attention_backward(dout, cache)
    assert rel_err(out, want_out) < F32_TOL
    assert rel_err(lse, cache.logsumexp) < F32_TOL
    assert grads_err((dq, dk, dv), want_grads) < F32_TOL
    plain_out, plain_grads = plain_attention(q, k, v, dout)
    assert rel_err(out, plain_out) < F32_TOL
    assert grads_err((dq, dk, dv), plain_grads) < F32_TOL


@pytest.mark.parametrize("shape", [(2, 2, 65, 64), (1, 2, 130, 32)])
def test_float32_dropout_matches_plain_attention_with_the_same_mask(shape):
    q, k, v, dout = (x.astype(np.float32).astype(np.float64) for x in random_inputs(shape, 7))
    B, H, T, _ = shape
    mask = ref.make_dropout_mask(device_rng(cupy, 3), (B, H, T, T), 0.2, cupy.float32)
    gq, gk, gv, gdout = (cupy.asarray(x, dtype=cupy.float32) for x in (q, k, v, dout))
    out, lse = flash.flash_attention(gq, gk, gv, mask)
    dq, dk, dv = flash.flash_attention_backward(gdout, gq, gk, gv, out, lse, mask)
    want_out, want_grads = plain_attention(q, k, v, dout, to_numpy(mask).astype(np.float64))
    assert rel_err(out, want_out) < F32_TOL
    assert grads_err((dq, dk, dv), want_grads) < F32_TOL


def bf16_device(x):
    """x rounded to bfloat16 on the GPU (CuPy's bfloat16 dtype, else its bit patterns as uint16)."""
    import ml_dtypes

    host = np.asarray(x).astype(ml_dtypes.bfloat16)
    try:
        return cupy.asarray(host)
    except Exception:  # this CuPy has no bfloat16 dtype
        return cupy.asarray(host.view(np.uint16))


def bf16_host(x):
    """A bf16 GPU array (either form) as float64 on the host."""
    import ml_dtypes

    host = cupy.asnumpy(x)
    return (host.view(ml_dtypes.bfloat16) if host.dtype == np.uint16 else host).astype(np.float64)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 2, 37, 64),
        (2, 3, 130, 64),
        (1, 2, 65, 128),
        (1, 1, 80, 16),
        (1, 2, 1, 32),
        (2, 1, 300, 96),
        (1, 1, 200, 48),
    ],
)
def test_bf16_tensor_core_kernels_match_float64_attention(shape, p):
    pytest.importorskip("ml_dtypes")
    gq, gk, gv, gdout = (bf16_device(x) for x in random_inputs(shape, sum(shape)))
    q, k, v, dout = (bf16_host(x) for x in (gq, gk, gv, gdout))  # the rounded numbers both sides see
    B, H, T, _ = shape
    mask = ref.make_dropout_mask(device_rng(cupy, 4), (B, H, T, T), p, cupy.float32) if p else None
    out, lse = flash.flash_attention(gq, gk, gv, mask)
    dq, dk, dv = flash.flash_attention_backward(gdout, gq, gk, gv, out, lse, mask)
    assert out.dtype == gq.dtype and lse.dtype == cupy.float32
    mask64 = None if mask is None else to_numpy(mask).astype(np.float64)
    want_out, want_grads = plain_attention(q, k, v, dout, mask64)
    assert rel_err(bf16_host(out), want_out) < BF16_TOL
    assert grads_err([bf16_host(g) for g in (dq, dk, dv)], want_grads) < BF16_TOL
    if mask is None:
        assert rel_err(lse, flash_attention_forward(q, k, v)[1].logsumexp) < BF16_TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_output_element_is_written_and_the_backward_is_deterministic(dtype):
    if dtype == "float32":
        device, host = (lambda x: cupy.asarray(x, dtype=cupy.float32)), cupy.asnumpy
    else:
        pytest.importorskip("ml_dtypes")
        device, host = bf16_device, bf16_host
    shape = (2, 3, 100, 64)
    q, k, v, dout = (device(x) for x in random_inputs(shape, 11))
    out = device(np.full(shape, np.nan))  # poisoned: an unwritten element stays NaN
    lse = flash.flash_forward(q, k, v, out)
    assert np.isfinite(host(out)).all() and bool(cupy.isfinite(lse).all())
    results = []
    for _ in range(2):
        grads = [device(np.full(shape, np.nan)) for _ in range(3)]
        flash.flash_backward(dout, q, k, v, out, lse, *grads)
        results.append([host(g) for g in grads])
        assert all(np.isfinite(g).all() for g in results[-1])
    for first, second in zip(*results):
        np.testing.assert_array_equal(first, second)  # no atomics: the same bits on every run


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_ops_attention_takes_the_flash_kernel_for_float32(p, monkeypatch):
    monkeypatch.setattr(fused_attention, "USE_FLASH", True)
    B, T, H, hs = 2, 70, 3, 32
    rng = np.random.default_rng(12)
    qkv64 = rng.standard_normal((B, T, 3 * H * hs)).astype(np.float32).astype(np.float64)
    dout64 = rng.standard_normal((B, T, H * hs)).astype(np.float32).astype(np.float64)
    mask = ref.make_dropout_mask(device_rng(cupy, 5), (B, H, T, T), p, cupy.float32) if p else None
    y, cache = CUDA_OPS.attention_forward(cupy.asarray(qkv64, dtype=cupy.float32), H, mask)
    assert isinstance(cache, flash.FlashAttentionCache)
    dqkv = CUDA_OPS.attention_backward(cupy.asarray(dout64, dtype=cupy.float32), cache)
    want_y, want_cache = ref.attention_forward(
        qkv64, H, None if mask is None else to_numpy(mask).astype(np.float64)
    )
    assert rel_err(y, want_y) < F32_TOL
    assert rel_err(dqkv, ref.attention_backward(dout64, want_cache)) < F32_TOL


def test_cuda_ops_keeps_the_cublas_attention_where_flash_does_not_apply(monkeypatch):
    monkeypatch.setattr(fused_attention, "USE_FLASH", True)
    qkv = cupy.ones((1, 8, 3 * 2 * 8), dtype=cupy.float32)  # head size 8: not a multiple of 16
    assert isinstance(CUDA_OPS.attention_forward(qkv, 2)[1], fused_attention.CudaAttentionCache)
    qkv = cupy.ones((1, 8, 3 * 2 * 16), dtype=cupy.float64)  # float64
    assert isinstance(CUDA_OPS.attention_forward(qkv, 2)[1], fused_attention.CudaAttentionCache)


def test_bad_inputs_are_refused_with_one_line():
    q = cupy.ones((1, 2, 8, 64), dtype=cupy.float32)
    with pytest.raises(ValueError, match="shape"):
        flash.flash_attention(q, q, q[:, :, :4])
    with pytest.raises(ValueError, match="head sizes"):
        flash.flash_attention(*(cupy.ones((1, 2, 8, 24), dtype=cupy.float32),) * 3)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        flash.flash_attention(*(cupy.ones((1, 2, 8, 64), dtype=cupy.float64),) * 3)
    with pytest.raises(ValueError, match="dropout_mask"):
        flash.flash_attention(q, q, q, cupy.ones((1, 2, 8, 9), dtype=cupy.float32))
    lse = flash.flash_attention(q, q, q)[1]  # row 0 sees key 0 alone: L = q . k / sqrt(64) = 64 / 8
    assert math.isclose(float(lse[0, 0, 0]), 8.0, rel_tol=1e-6)
