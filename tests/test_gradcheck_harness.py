"""The gradient checker must fail loudly on wrong gradients, and say where they are wrong.

Each test plants a classic backprop bug in a copy of a correct backward and asserts that the
checker rejects it with a message naming the tensor and both values.
"""

import numpy as np
import pytest

from minilora.gradcheck import GradCheckError, check_gradients, check_layer, relative_error
from minilora.layers import (
    attention_backward,
    attention_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)

TOL = 1e-7


@pytest.fixture
def rng():
    return np.random.default_rng(99)


def linear_backward_missing_transpose(dout, cache):
    dx, dW, db = linear_backward(dout, cache)
    return dout @ cache.W, dW, db  # bug: W instead of W^T (only square W lets this run at all)


def layernorm_backward_without_variance_term(dout, cache):
    _, dw, db = layernorm_backward(dout, cache)
    dxhat = dout * cache.w
    dx = (
        dxhat - dxhat.mean(axis=-1, keepdims=True)
    ) * cache.rstd  # bug: the xhat * mean(dxhat * xhat) term is dropped
    return dx, dw, db


def attention_backward_doubled_scale(dout, cache):
    return attention_backward(dout, cache._replace(scale=2 * cache.scale))  # bug: dq scaled twice as much


@pytest.mark.parametrize("mode", ["elementwise", "coordinates", "direction"])
def test_missing_transpose_in_linear_backward_fails_the_check(rng, mode):
    inputs = {
        "x": rng.standard_normal((2, 3, 4)),
        "W": rng.standard_normal((4, 4)),
        "b": rng.standard_normal(4),
    }
    result = check_layer(
        linear_forward, linear_backward_missing_transpose, inputs, ("x", "W", "b"), mode=mode
    )
    with pytest.raises(GradCheckError, match=r"gradient of 'x' is wrong"):
        result.assert_ok(TOL)


def test_dropped_variance_term_in_layernorm_backward_fails_the_check(rng):
    inputs = {"x": rng.standard_normal((2, 3, 6)), "w": rng.standard_normal(6), "b": rng.standard_normal(6)}
    result = check_layer(layernorm_forward, layernorm_backward_without_variance_term, inputs, ("x", "w", "b"))
    assert result.errors()["w"] < TOL and result.errors()["b"] < TOL  # only dx is wrong
    with pytest.raises(GradCheckError, match="'x'"):
        result.assert_ok(TOL)


def test_doubled_scale_in_attention_backward_fails_the_check(rng):
    inputs = {"qkv": rng.standard_normal((2, 4, 12))}
    result = check_layer(
        lambda qkv: attention_forward(qkv, 2), attention_backward_doubled_scale, inputs, ("qkv",)
    )
    assert result.max_error > 0.1
    with pytest.raises(GradCheckError):
        result.assert_ok(TOL)


def test_failure_message_names_index_and_both_values():
    params = {"w": np.array([1.0, 2.0, 3.0])}
    wrong = {"w": np.array([2.0, 4.0, 7.0])}  # the gradient of sum(w^2) is 2w = [2, 4, 6]
    result = check_gradients(lambda: np.sum(params["w"] ** 2), params, wrong)
    with pytest.raises(GradCheckError) as err:
        result.assert_ok(TOL)
    message = str(err.value)
    assert "'w'" in message and "(2,)" in message
    assert "analytic 7.0" in message and "numeric 6.0" in message


def test_correct_gradient_passes_and_parameters_are_restored():
    params = {"w": np.array([1.0, -2.0, 0.5])}
    before = params["w"].copy()
    for mode in ("elementwise", "coordinates", "direction"):
        result = check_gradients(
            lambda: np.sum(np.sin(params["w"])), params, {"w": np.cos(params["w"])}, mode=mode
        )
        result.assert_ok(1e-9)
    np.testing.assert_array_equal(params["w"], before)


def test_nan_gradient_fails_the_check():
    params = {"w": np.array([1.0, 2.0])}
    result = check_gradients(lambda: np.sum(params["w"]), params, {"w": np.array([1.0, np.nan])})
    with pytest.raises(GradCheckError):
        result.assert_ok(TOL)


def test_float32_parameters_are_refused():
    params = {"w": np.ones(3, dtype=np.float32)}
    with pytest.raises(TypeError, match="float64"):
        check_gradients(lambda: np.sum(params["w"]), params, {"w": np.ones(3)})


def test_gradient_of_wrong_shape_is_refused():
    params = {"w": np.ones(3)}
    with pytest.raises(GradCheckError, match="shape"):
        check_gradients(lambda: np.sum(params["w"]), params, {"w": np.ones(4)})


def test_relative_error_is_scale_free_and_zero_for_equal_arrays():
    a = np.array([1.0, -2.0, 3.0])
    assert relative_error(a, a) == 0.0
    assert relative_error(1e6 * a, 1e6 * (a + [0, 0, 0.003])) == pytest.approx(
        0.003 / 3.003
    )  # denominator: the largest magnitude
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
