"""Tiled (flash) attention against plain attention, finite differences and an independent logsumexp.

The expected values never come from flash_attention.py: the plain attention of attention.py (its
forward and its backward), scores and logsumexps written out here in NumPy, central finite
differences in float64, and PyTorch's scaled_dot_product_attention where torch is installed.
Sequence lengths are chosen both as multiples of the tile width and not, and with one tile wider
than the whole sequence.
"""

import math
from functools import partial

import numpy as np
import pytest

from minilora.backend import count_matmuls, to_device, to_numpy
from minilora.gradcheck import check_layer, relative_error
from minilora.layers import (
    attention_backward,
    attention_forward,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    merge_heads,
)
from minilora.layers.attention import scaled_dot_product_attention, split_heads

B, H, hs = 2, 3, 4
LENGTHS_AND_BLOCKS = [(1, 4), (8, 4), (10, 4), (7, 3), (16, 1), (5, 8), (13, 5)]


def random_qkv(rng, T, dtype=np.float64, magnitude=1.0):
    return tuple((magnitude * rng.standard_normal((B, H, T, hs))).astype(dtype) for _ in range(3))


def plain_attention(q, k, v):
    """(B, H, T, hs) output of attention.py's scaled_dot_product_attention, the reference."""
    return scaled_dot_product_attention(q, k, v)[0]


def fuse_heads(q, k, v):
    """q, k, v (B, H, T, hs) -> the (B, T, 3C) qkv that attention_forward splits apart again."""
    return np.concatenate([merge_heads(q), merge_heads(k), merge_heads(v)], axis=-1)


def logsumexp_of_causal_scores(q, k):
    """log sum_j exp(q_i . k_j / sqrt(hs)) over the keys j <= i, in float64: (B, H, T)."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    T = q.shape[2]
    scores = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    return (row_max + np.log(np.exp(scores - row_max).sum(axis=-1, keepdims=True)))[..., 0]


@pytest.fixture
def rng():
    return np.random.default_rng(2022)


@pytest.mark.parametrize("T, block", LENGTHS_AND_BLOCKS)
def test_flash_forward_equals_plain_attention_in_float64(rng, T, block):
    q, k, v = random_qkv(rng, T)
    out, _ = flash_attention(q, k, v, block)
    np.testing.assert_allclose(out, plain_attention(q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T, block", [(10, 4), (32, 8), (33, 16)])
def test_flash_forward_equals_plain_attention_in_float32(rng, T, block):
    q, k, v = random_qkv(rng, T, np.float32)
    out, _ = flash_attention(q, k, v, block)
    np.testing.assert_allclose(out, plain_attention(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T, block", LENGTHS_AND_BLOCKS)
def test_flash_logsumexp_equals_the_scores_logsumexp(rng, T, block):
    q, k, v = random_qkv(rng, T)
    _, logsumexp = flash_attention(q, k, v, block)
    assert logsumexp.shape == (B, H, T)
    np.testing.assert_allclose(logsumexp, logsumexp_of_causal_scores(q, k), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T, block", [(7, 3), (8, 4), (5, 8)])
def test_flash_backward_matches_finite_differences(rng, T, block):
    q, k, v = random_qkv(rng, T)
    forward = partial(flash_attention_forward, block=block)
    result = check_layer(forward, flash_attention_backward, {"q": q, "k": k, "v": v}, ("q", "k", "v"))
    result.assert_ok(1e-7)


@pytest.mark.parametrize("T, block", LENGTHS_AND_BLOCKS)
def test_flash_backward_equals_plain_attention_backward(rng, T, block):
    q, k, v = random_qkv(rng, T)
    dout = rng.standard_normal((B, H, T, hs))
    out, cache = flash_attention_forward(q, k, v, block)
    dq, dk, dv = flash_attention_backward(dout, cache)

    _, plain_cache = attention_forward(fuse_heads(q, k, v), H)
    dqkv = attention_backward(merge_heads(dout), plain_cache)  # (B, T, 3C)
    for mine, expected in zip((dq, dk, dv), split_heads(dqkv, H)):
        np.testing.assert_allclose(mine, expected, rtol=1e-12, atol=1e-12)


def test_flash_attention_matches_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    T, block = 11, 4
    q, k, v = random_qkv(rng, T)
    dout = rng.standard_normal((B, H, T, hs))
    out, cache = flash_attention_forward(q, k, v, block)
    grads = flash_attention_backward(dout, cache)

    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    t_out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    t_out.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-12, atol=1e-12)
    for mine, tensor in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(mine, tensor.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_flash_attention_keeps_float32(rng):
    q, k, v = random_qkv(rng, 9, np.float32)
    out, cache = flash_attention_forward(q, k, v, block=4)
    grads = flash_attention_backward(np.ones_like(out), cache)
    assert out.dtype == cache.logsumexp.dtype == np.float32
    assert all(grad.dtype == np.float32 and grad.shape == q.shape for grad in grads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flash_attention_stays_finite_for_scores_near_a_thousand(rng, dtype):
    T = 12
    q, k, v = random_qkv(rng, T, dtype, magnitude=30.0)
    scores = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(hs)
    assert np.abs(scores).max() > 500  # large enough that exp(scores) overflows even float64
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(scores)).any()
    out, cache = flash_attention_forward(q, k, v, block=5)
    grads = flash_attention_backward(rng.standard_normal(out.shape).astype(dtype), cache)
    assert all(np.isfinite(x).all() for x in (out, cache.logsumexp, *grads))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert relative_error(out, plain_attention(q, k, v)) < tol


def test_flash_forward_never_forms_a_T_by_T_score_matrix(rng):
    T, block = 32, 8
    q, k, v = random_qkv(rng, T)
    with count_matmuls() as log:
        flash_attention(q, k, v, block)
    widths = {out[-1] for _, _, out in log.products}
    assert widths == {block, hs}  # score tiles (rows, block) and output tiles (rows, hs), never (T, T)
    n_tiles = T // block
    assert len(log.products) == 2 * n_tiles  # q k^T and P v per tile
    queries_per_tile = sum(T - start for start in range(0, T, block))  # the queries each tile is shown
    assert log.flops == 2 * (
        2 * B * H * queries_per_tile * block * hs
    )  # the tiles above the diagonal skipped


@pytest.mark.parametrize(
    "shapes, block",
    [(((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 4)), 2), (((1, 2, 5, 4),) * 3, 0), (((2, 5, 4),) * 3, 2)],
)
def test_flash_attention_refuses_mismatched_shapes_and_empty_tiles(shapes, block):
    q, k, v = (np.zeros(shape) for shape in shapes)
    with pytest.raises(ValueError):
        flash_attention(q, k, v, block)


@pytest.mark.gpu
def test_flash_attention_on_cupy_float32_matches_numpy_float64(rng):
    T, block = 40, 16
    q, k, v = random_qkv(rng, T)
    dout = rng.standard_normal((B, H, T, hs))
    out, cache = flash_attention_forward(q, k, v, block)
    grads = flash_attention_backward(dout, cache)
    gpu = [to_device(x.astype(np.float32), "cuda") for x in (q, k, v, dout)]
    out_gpu, cache_gpu = flash_attention_forward(*gpu[:3], block)
    grads_gpu = flash_attention_backward(gpu[3], cache_gpu)
    for expected, got in zip((out, cache.logsumexp, *grads), (out_gpu, cache_gpu.logsumexp, *grads_gpu)):
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert relative_error(to_numpy(got).astype(np.float64), expected) < 2e-5
