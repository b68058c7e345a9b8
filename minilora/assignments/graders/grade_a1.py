"""Grader for a1: linear, GELU and softmax cross-entropy.

Every number a part feeds the submission is drawn from the part's ``rng`` (the finite-difference
checks' upstream gradients too, through their seed), so no part can be passed by fitting fixed inputs.

A backward made by differentiating the student's own forward numerically (complex-step
differentiation is exact to rounding) would pass every value check, so one part counts the calls
each backward makes to its forward and allows none. Its limit: the count follows the forward's code
object (``sandbox.counted_calls``), so a backward that runs a copy of the forward's body under another
name is not counted; only reading the code catches that.
"""

import numpy as np
import pytest

from minilora.assignments.sandbox import counted_calls
from minilora.gradcheck import check_layer

TOL = 1e-7


def seed_of(rng):
    """A seed for check_layer's upstream gradient, drawn from the part's generator."""
    return int(rng.integers(2**31))


def gelu_by_formula(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def gelu_derivative(x):
    t = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x**2)


def log_softmax(logits):
    """(..., V) -> (..., V), shifted by the row max so that it never overflows."""
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def mean_cross_entropy(logits, targets):
    return -np.take_along_axis(log_softmax(logits), targets[..., None], -1).mean()


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
    check_layer(m.linear_forward, m.linear_backward, inputs, ("x", "W", "b"), seed=seed_of(rng)).assert_ok(
        TOL
    )


@pytest.mark.points(1)
def test_linear_backward_skips_the_frozen_weight_gradient(student, rng):
    m = student["linear"]
    x, W, b = rng.standard_normal((2, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    out, cache = m.linear_forward(x, W, b)
    dout = rng.standard_normal(out.shape)  # (2, 3)
    dx, dW, db = m.linear_backward(dout, cache, compute_dW=False)
    assert dW is None, "compute_dW=False: dW must be None"
    np.testing.assert_allclose(dx, dout @ W.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, dout.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.points(1)
def test_linear_backward_skips_the_frozen_bias_gradient(student, rng):
    """A frozen bias (compute_db=False, as LoRA's model asks for) gets no gradient: AdamW refuses a
    gradient of a parameter it does not train (KeyError), so a db summed anyway breaks training."""
    m = student["linear"]
    x, W, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    out, cache = m.linear_forward(x, W, b)
    dout = rng.standard_normal(out.shape)  # (2, 3, 5)
    dx, dW, db = m.linear_backward(dout, cache, compute_db=False)
    assert db is None, "compute_db=False: db must be None"
    np.testing.assert_allclose(dW, np.einsum("btc,btd->cd", x, dout), rtol=1e-12, atol=1e-12)
    _, dW, db = m.linear_backward(dout, cache, compute_dW=False, compute_db=False)
    assert dW is None and db is None, "both frozen: neither gradient"


@pytest.mark.points(1)
def test_gelu_forward_on_drawn_inputs(student, rng):
    x = rng.uniform(-4.0, 4.0, (3, 7))  # both tails, the bend near 0 and the nearly linear side
    np.testing.assert_allclose(student["gelu"].gelu_forward(x)[0], gelu_by_formula(x), rtol=1e-12, atol=1e-15)


@pytest.mark.points(2)
def test_gelu_backward_matches_finite_differences(student, rng):
    m = student["gelu"]
    inputs = {"x": 2 * rng.standard_normal((3, 7))}
    check_layer(m.gelu_forward, m.gelu_backward, inputs, ("x",), seed=seed_of(rng)).assert_ok(TOL)


@pytest.mark.points(1)
def test_cross_entropy_forward_on_drawn_inputs(student, rng):
    logits, targets = rng.standard_normal((2, 3, 6)), rng.integers(0, 6, (2, 3))
    loss, _ = student["cross_entropy"].cross_entropy_forward(logits, targets)
    assert float(loss) == pytest.approx(mean_cross_entropy(logits, targets), rel=1e-12)


@pytest.mark.points(2)
def test_cross_entropy_backward_matches_finite_differences(student, rng):
    m = student["cross_entropy"]
    inputs = {"logits": 3 * rng.standard_normal((2, 3, 6)), "targets": rng.integers(0, 6, (2, 3))}
    check_layer(
        m.cross_entropy_forward, m.cross_entropy_backward, inputs, ("logits",), seed=seed_of(rng)
    ).assert_ok(TOL)


@pytest.mark.points(1)
def test_linear_without_a_bias_and_in_float32(student, rng):
    """The tied output head calls linear_forward(x, W) with no bias; training runs in float32."""
    m = student["linear"]
    x, W, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    dout = rng.standard_normal((2, 3, 5))
    out, cache = m.linear_forward(x, W)
    np.testing.assert_allclose(out, x @ W, rtol=1e-12, atol=1e-12)
    dx, dW, db = m.linear_backward(dout, cache)
    assert db is None and dW.shape == W.shape, "no bias, no bias gradient"
    f32 = [a.astype(np.float32) for a in (x, W, b, dout)]
    out32, cache32 = m.linear_forward(*f32[:3])
    grads32 = m.linear_backward(f32[3], cache32)
    assert out32.dtype == np.float32 and all(g.dtype == np.float32 for g in grads32), (
        "float32 in, float32 out"
    )
    np.testing.assert_allclose(out32, x @ W + b, rtol=1e-4, atol=1e-5)


@pytest.mark.points(1)
def test_gelu_keeps_float32_and_stays_finite_far_out(student, rng):
    """Drawn points and the far tails at +-40, where x^3 is large and tanh must saturate, not overflow."""
    m = student["gelu"]
    x = np.concatenate([rng.uniform(-8.0, 8.0, 6), [-40.0, 40.0]])
    dout = rng.standard_normal(x.shape)
    out32, cache32 = m.gelu_forward(x.astype(np.float32))
    assert out32.dtype == np.float32, "float32 in, float32 out"
    dx32 = m.gelu_backward(dout.astype(np.float32), cache32)
    assert dx32.dtype == np.float32, "float32 in, float32 out"
    np.testing.assert_allclose(out32, gelu_by_formula(x), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(dx32)), "the gradient is not finite far out"
    np.testing.assert_allclose(dx32, dout * gelu_derivative(x), rtol=1e-4, atol=1e-5)


@pytest.mark.points(2)
def test_cross_entropy_of_large_logits_is_finite_and_exact(student, rng):
    """Logits near 1e3, as an untrained head can make them: exp overflows unless the row max is shifted out."""
    m = student["cross_entropy"]
    logits, targets = 1000 + 50 * rng.standard_normal((3, 4, 6)), rng.integers(0, 6, (3, 4))
    dloss = rng.uniform(0.5, 2.0)
    loss, cache = m.cross_entropy_forward(logits, targets)
    assert np.isfinite(float(loss)), "the loss overflowed: shift each row by its max before exp"
    assert float(loss) == pytest.approx(mean_cross_entropy(logits, targets), rel=1e-10)
    onehot = np.eye(6)[targets]
    expected = dloss * (np.exp(log_softmax(logits)) - onehot) / targets.size
    np.testing.assert_allclose(m.cross_entropy_backward(dloss, cache), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.points(1)
def test_cross_entropy_keeps_float32(student, rng):
    """The loss and dlogits of float32 logits stay float32: a float64 one-hot or loss doubles the head's
    memory and slows every matmul after it, with no error anywhere."""
    m = student["cross_entropy"]
    logits, targets = 3 * rng.standard_normal((2, 3, 6)), rng.integers(0, 6, (2, 3))
    dloss = rng.uniform(0.5, 2.0)
    loss, cache = m.cross_entropy_forward(logits.astype(np.float32), targets)
    assert np.asarray(loss).dtype == np.float32, "float32 in, float32 out"
    dlogits = m.cross_entropy_backward(dloss, cache)
    assert dlogits.dtype == np.float32, "float32 in, float32 out"
    assert float(loss) == pytest.approx(mean_cross_entropy(logits, targets), rel=1e-5)
    onehot = np.eye(6)[targets]
    expected = dloss * (np.exp(log_softmax(logits)) - onehot) / targets.size
    np.testing.assert_allclose(dlogits, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.points(1)
def test_no_backward_runs_its_forward(student, rng):
    """Each backward computes its formula from the cache: zero calls to its forward (see the docstring)."""
    linear, gelu, ce = student["linear"], student["gelu"], student["cross_entropy"]
    x, W, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    out, cache = linear.linear_forward(x, W, b)
    _, calls = counted_calls(
        linear.linear_backward, ["linear_forward"], rng.standard_normal(out.shape), cache
    )
    assert calls == {"linear_forward": 0}, f"linear_backward ran linear_forward: {calls}"
    x = 2 * rng.standard_normal((3, 7))
    out, cache = gelu.gelu_forward(x)
    _, calls = counted_calls(gelu.gelu_backward, ["gelu_forward"], rng.standard_normal(out.shape), cache)
    assert calls == {"gelu_forward": 0}, f"gelu_backward ran gelu_forward: {calls}"
    logits, targets = 3 * rng.standard_normal((2, 3, 6)), rng.integers(0, 6, (2, 3))
    _, cache = ce.cross_entropy_forward(logits, targets)
    _, calls = counted_calls(
        ce.cross_entropy_backward, ["cross_entropy_forward"], rng.uniform(0.5, 2.0), cache
    )
    assert calls == {"cross_entropy_forward": 0}, f"cross_entropy_backward ran cross_entropy_forward: {calls}"


@pytest.mark.points(1)
def test_cross_entropy_scores_only_the_targets_not_ignored(student, rng):
    """Instruction tuning marks the prompt's targets IGNORE (-100): the loss is the mean over the other
    rows, and the ignored rows get no gradient. A plain mean would train on the prompt, or index row -100."""
    m = student["cross_entropy"]
    logits, targets = 3 * rng.standard_normal((2, 5, 6)), rng.integers(0, 6, (2, 5))
    targets[0, 1:4] = targets[1, 0] = -100
    scored = targets != -100
    expected = -log_softmax(logits)[scored, targets[scored]].mean()
    loss, cache = m.cross_entropy_forward(logits, targets)
    assert float(loss) == pytest.approx(expected, rel=1e-12), "the mean over the scored rows alone"
    dloss = rng.uniform(0.5, 2.0)
    onehot = np.where(scored[..., None], np.eye(6)[np.where(scored, targets, 0)], 0.0)
    expected_grad = dloss * (np.exp(log_softmax(logits)) - onehot) * scored[..., None] / scored.sum()
    np.testing.assert_allclose(m.cross_entropy_backward(dloss, cache), expected_grad, rtol=1e-10, atol=1e-13)
