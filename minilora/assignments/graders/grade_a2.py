"""Grader for a2: LayerNorm and embeddings."""

import numpy as np
import pytest

from minilora.gradcheck import check_layer

TOL = 1e-7


@pytest.mark.points(1)
def test_layernorm_forward_on_drawn_inputs(student, rng):
    x, w, b = 3 + 2 * rng.standard_normal((2, 3, 8)), rng.standard_normal(8), rng.standard_normal(8)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(
        student["layernorm"].layernorm_forward(x, w, b)[0], expected, rtol=1e-10, atol=1e-12
    )


@pytest.mark.points(3)
def test_layernorm_backward_matches_finite_differences(student, rng):
    m = student["layernorm"]
    inputs = {
        "x": 3 + 2 * rng.standard_normal((2, 3, 8)),
        "w": 1 + rng.standard_normal(8),
        "b": rng.standard_normal(8),
    }
    check_layer(m.layernorm_forward, m.layernorm_backward, inputs, ("x", "w", "b")).assert_ok(TOL)


@pytest.mark.points(1)
def test_embedding_forward_picks_rows(student, rng):
    table, ids = rng.standard_normal((10, 4)), np.array([[3, 3, 9], [0, 1, 3]])
    np.testing.assert_array_equal(student["embedding"].embedding_forward(ids, table)[0], table[ids])


@pytest.mark.points(2)
def test_embedding_backward_with_repeated_ids_matches_finite_differences(student, rng):
    m = student["embedding"]
    inputs = {"ids": np.array([[3, 3, 9], [0, 3, 3]]), "table": rng.standard_normal((10, 4))}
    check_layer(m.embedding_forward, m.embedding_backward, inputs, ("table",)).assert_ok(TOL)


@pytest.mark.points(2)
def test_layernorm_of_rows_with_a_large_mean_in_float32(student, rng):
    """Activations with mean 1e3: E[x^2] - E[x]^2 cancels catastrophically in float32, (x - mean)^2 does not."""
    m = student["layernorm"]
    x = 1000 + rng.standard_normal((4, 64))
    w, b = 1 + 0.1 * rng.standard_normal(64), 0.1 * rng.standard_normal(64)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    out, cache = m.layernorm_forward(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32))
    assert out.dtype == np.float32, "float32 in, float32 out"
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-3)
    dx, dw, db = m.layernorm_backward(np.ones_like(out), cache)
    assert dx.dtype == dw.dtype == db.dtype == np.float32, "float32 in, float32 out"


@pytest.mark.points(1)
def test_layernorm_without_a_bias(student, rng):
    m = student["layernorm"]
    x, w = 3 + 2 * rng.standard_normal((2, 3, 8)), 1 + rng.standard_normal(8)
    out, cache = m.layernorm_forward(x, w)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    assert m.layernorm_backward(np.ones_like(out), cache)[2] is None, "no bias, no bias gradient"
    check_layer(
        lambda x, w: m.layernorm_forward(x, w),
        lambda dout, cache: m.layernorm_backward(dout, cache)[:2],
        {"x": x, "w": w},
        ("x", "w"),
    ).assert_ok(TOL)
