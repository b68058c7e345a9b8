"""Grader for a1: linear, GELU and softmax cross-entropy."""

import numpy as np
import pytest

from minilora.gradcheck import check_layer

TOL = 1e-7


@pytest.fixture
def rng():
    return np.random.default_rng(101)


@pytest.mark.points(1)
def test_linear_forward_on_a_fixed_input(student, rng):
    x, W, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    out, _ = student["linear"].linear_forward(x, W, b)
    np.testing.assert_allclose(out, np.einsum("btc,cd->btd", x, W) + b, rtol=1e-12, atol=1e-12)


@pytest.mark.points(3)
def test_linear_backward_matches_finite_differences(student, rng):
    m = student["linear"]
    inputs = {
        "x": rng.standard_normal((2, 3, 4)),
        "W": rng.standard_normal((4, 5)),
        "b": rng.standard_normal(5),
    }
    check_layer(m.linear_forward, m.linear_backward, inputs, ("x", "W", "b")).assert_ok(TOL)


@pytest.mark.points(1)
def test_linear_backward_skips_the_frozen_weight_gradient(student, rng):
    m = student["linear"]
    out, cache = m.linear_forward(
        rng.standard_normal((2, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    )
    dx, dW, db = m.linear_backward(np.ones_like(out), cache, compute_dW=False)
    assert dW is None and dx.shape == (2, 4) and np.allclose(db, 2.0)


@pytest.mark.points(1)
def test_gelu_forward_on_a_fixed_input(student):
    x = np.array([-3.0, -1.0, -0.1, 0.0, 0.5, 2.0])
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(student["gelu"].gelu_forward(x)[0], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.points(2)
def test_gelu_backward_matches_finite_differences(student, rng):
    m = student["gelu"]
    check_layer(m.gelu_forward, m.gelu_backward, {"x": 2 * rng.standard_normal((3, 7))}, ("x",)).assert_ok(
        TOL
    )


@pytest.mark.points(1)
def test_cross_entropy_forward_on_a_fixed_input(student, rng):
    logits, targets = rng.standard_normal((2, 3, 6)), rng.integers(0, 6, (2, 3))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    loss, _ = student["cross_entropy"].cross_entropy_forward(logits, targets)
    assert float(loss) == pytest.approx(expected, rel=1e-12)


@pytest.mark.points(2)
def test_cross_entropy_backward_matches_finite_differences(student, rng):
    m = student["cross_entropy"]
    inputs = {"logits": 3 * rng.standard_normal((2, 3, 6)), "targets": rng.integers(0, 6, (2, 3))}
    check_layer(m.cross_entropy_forward, m.cross_entropy_backward, inputs, ("logits",)).assert_ok(TOL)
