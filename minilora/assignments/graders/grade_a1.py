"""Grader for a1: linear, GELU and softmax cross-entropy."""

import numpy as np
import pytest

from minilora.gradcheck import check_layer

TOL = 1e-7


@pytest.mark.points(1)
def test_linear_forward_on_drawn_inputs(student, rng):
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
def test_cross_entropy_forward_on_drawn_inputs(student, rng):
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


@pytest.mark.points(1)
def test_linear_without_a_bias_and_in_float32(student, rng):
    """The tied output head calls linear_forward(x, W) with no bias; training runs in float32."""
    m = student["linear"]
    x, W = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5))
    out, cache = m.linear_forward(x, W)
    np.testing.assert_allclose(out, x @ W, rtol=1e-12, atol=1e-12)
    dx, dW, db = m.linear_backward(np.ones_like(out), cache)
    assert db is None and dW.shape == W.shape
    out32, cache32 = m.linear_forward(x.astype(np.float32), W.astype(np.float32), np.zeros(5, np.float32))
    grads32 = m.linear_backward(np.ones_like(out32), cache32)
    assert out32.dtype == np.float32 and all(g.dtype == np.float32 for g in grads32), (
        "float32 in, float32 out"
    )


@pytest.mark.points(1)
def test_gelu_keeps_float32_and_stays_finite_far_out(student):
    m = student["gelu"]
    x = np.array([-40.0, -8.0, -1.0, 0.0, 1.0, 8.0, 40.0])
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    out32, cache32 = m.gelu_forward(x.astype(np.float32))
    assert out32.dtype == np.float32, "float32 in, float32 out"
    assert m.gelu_backward(np.ones_like(out32), cache32).dtype == np.float32
    np.testing.assert_allclose(out32, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.points(2)
def test_cross_entropy_of_large_logits_is_finite_and_exact(student, rng):
    """Logits near 1e3, as an untrained head can make them: exp overflows unless the row max is shifted out."""
    m = student["cross_entropy"]
    logits, targets = 1000 + 50 * rng.standard_normal((3, 4, 6)), rng.integers(0, 6, (3, 4))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    loss, cache = m.cross_entropy_forward(logits, targets)
    assert np.isfinite(float(loss)), "the loss overflowed: shift each row by its max before exp"
    assert float(loss) == pytest.approx(expected, rel=1e-10)
    onehot = np.eye(6)[targets]
    dlogits = m.cross_entropy_backward(1.0, cache)
    np.testing.assert_allclose(dlogits, (np.exp(log_probs) - onehot) / targets.size, rtol=1e-9, atol=1e-12)
