"""Grader for a2: LayerNorm and embeddings.

Every number a part feeds the submission is drawn from the part's ``rng`` (the ids and the
finite-difference checks' upstream gradients too), so no part can be passed by fitting fixed inputs.
"""

import numpy as np
import pytest

from minilora.gradcheck import check_layer

TOL = 1e-7
V, C = 10, 4  # the embedding table's rows and width


def seed_of(rng):
    """A seed for check_layer's upstream gradient, drawn from the part's generator."""
    return int(rng.integers(2**31))


def layernorm_by_formula(x, w, b=0.0):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b


def ids_with_repeats(rng, shape):
    """Ids drawn from 4 distinct rows of the table: more positions than rows, so some id always repeats."""
    rows = rng.choice(V, size=4, replace=False)
    return rows[rng.integers(0, 4, shape)]


@pytest.mark.points(1)
def test_layernorm_forward_on_drawn_inputs(student, rng):
    x, w, b = 3 + 2 * rng.standard_normal((2, 3, 8)), rng.standard_normal(8), rng.standard_normal(8)
    np.testing.assert_allclose(
        student["layernorm"].layernorm_forward(x, w, b)[0],
        layernorm_by_formula(x, w, b),
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.points(3)
def test_layernorm_backward_matches_finite_differences(student, rng):
    m = student["layernorm"]
    inputs = {
        "x": 3 + 2 * rng.standard_normal((2, 3, 8)),
        "w": 1 + rng.standard_normal(8),
        "b": rng.standard_normal(8),
    }
    check_layer(
        m.layernorm_forward, m.layernorm_backward, inputs, ("x", "w", "b"), seed=seed_of(rng)
    ).assert_ok(TOL)


@pytest.mark.points(1)
def test_embedding_forward_picks_rows(student, rng):
    table, ids = rng.standard_normal((V, C)), rng.integers(0, V, (2, 3))
    np.testing.assert_array_equal(student["embedding"].embedding_forward(ids, table)[0], table[ids])


@pytest.mark.points(2)
def test_embedding_backward_with_repeated_ids_matches_finite_differences(student, rng):
    m = student["embedding"]
    inputs = {"ids": ids_with_repeats(rng, (2, 3)), "table": rng.standard_normal((V, C))}
    check_layer(m.embedding_forward, m.embedding_backward, inputs, ("table",), seed=seed_of(rng)).assert_ok(
        TOL
    )


@pytest.mark.points(2)
def test_layernorm_of_rows_with_a_large_mean_in_float32(student, rng):
    """Activations with mean 1e3: E[x^2] - E[x]^2 cancels catastrophically in float32, (x - mean)^2 does not."""
    m = student["layernorm"]
    x = 1000 + rng.standard_normal((4, 64))
    w, b = 1 + 0.1 * rng.standard_normal(64), 0.1 * rng.standard_normal(64)
    out, cache = m.layernorm_forward(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32))
    assert out.dtype == np.float32, "float32 in, float32 out"
    np.testing.assert_allclose(out, layernorm_by_formula(x, w, b), rtol=0, atol=2e-3)
    dx, dw, db = m.layernorm_backward(rng.standard_normal(out.shape).astype(np.float32), cache)
    assert dx.dtype == dw.dtype == db.dtype == np.float32, "float32 in, float32 out"


@pytest.mark.points(1)
def test_layernorm_without_a_bias(student, rng):
    m = student["layernorm"]
    x, w = 3 + 2 * rng.standard_normal((2, 3, 8)), 1 + rng.standard_normal(8)
    out, cache = m.layernorm_forward(x, w)
    np.testing.assert_allclose(out, layernorm_by_formula(x, w), rtol=1e-10, atol=1e-12)
    assert m.layernorm_backward(rng.standard_normal(out.shape), cache)[2] is None, "no bias, no bias gradient"
    check_layer(
        lambda x, w: m.layernorm_forward(x, w),
        lambda dout, cache: m.layernorm_backward(dout, cache)[:2],
        {"x": x, "w": w},
        ("x", "w"),
        seed=seed_of(rng),
    ).assert_ok(TOL)


@pytest.mark.points(1)
def test_embedding_keeps_float32(student, rng):
    """A float32 table gives float32 rows, and a float32 dout a float32 dtable: a zero table made
    without a dtype is float64 and doubles the largest gradient of the model."""
    m = student["embedding"]
    table, ids = rng.standard_normal((V, C)).astype(np.float32), ids_with_repeats(rng, (2, 5))
    out, cache = m.embedding_forward(ids, table)
    assert out.dtype == np.float32, "float32 in, float32 out"
    dout = rng.standard_normal((2, 5, C)).astype(np.float32)
    dtable = m.embedding_backward(dout, cache)
    assert dtable.dtype == np.float32, "float32 in, float32 out"
    expected = np.zeros((V, C))
    np.add.at(expected, ids.reshape(-1), dout.reshape(-1, C))
    np.testing.assert_allclose(dtable, expected, rtol=1e-5, atol=1e-6)
