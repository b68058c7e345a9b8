"""Grader for a5: the LoRA layer and merging."""

import numpy as np
import pytest

from minilora.gradcheck import check_layer
from minilora.layers import linear_forward, make_dropout_mask

TOL = 1e-7


def inputs(rng, r=3):
    return {
        "x": rng.standard_normal((2, 4, 6)),
        "lora_A": rng.standard_normal((r, 6)),
        "lora_B": rng.standard_normal((5, r)),
    }


@pytest.mark.points(1)
def test_lora_forward_on_drawn_inputs(student, rng):
    x, lora_A, lora_B = inputs(rng).values()
    delta, _ = student["layer"].lora_forward(x, lora_A, lora_B, 2.5)
    np.testing.assert_allclose(delta, 2.5 * x @ lora_A.T @ lora_B.T, rtol=1e-12, atol=1e-12)


@pytest.mark.points(3)
def test_lora_backward_with_nonzero_lora_B_matches_finite_differences(student, rng):
    m = student["layer"]
    check_layer(
        lambda x, lora_A, lora_B: m.lora_forward(x, lora_A, lora_B, 2.5),
        m.lora_backward,
        inputs(rng),
        ("x", "lora_A", "lora_B"),
    ).assert_ok(TOL)


@pytest.mark.points(1)
def test_at_zero_lora_B_only_lora_B_gets_a_gradient(student, rng):
    x, lora_A, lora_B = inputs(rng).values()
    _, cache = student["layer"].lora_forward(x, lora_A, np.zeros_like(lora_B), 2.0)
    _, dlora_A, dlora_B = student["layer"].lora_backward(rng.standard_normal((2, 4, 5)), cache)
    assert np.all(dlora_A == 0) and np.count_nonzero(dlora_B) == dlora_B.size


@pytest.mark.points(2)
def test_merged_weight_gives_the_adapted_layer_output(student, rng):
    m = student["layer"]
    x, lora_A, lora_B = inputs(rng).values()
    W, b = rng.standard_normal((6, 5)), rng.standard_normal(5)
    adapted, _ = m.lora_linear_forward(x, W, b, lora_A, lora_B, 2.5)
    merged, _ = linear_forward(x, m.merge_weight(W, lora_A, lora_B, 2.5), b)
    np.testing.assert_allclose(merged, adapted, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        merged - linear_forward(x, W, b)[0], 2.5 * x @ lora_A.T @ lora_B.T, rtol=1e-10, atol=1e-12
    )


@pytest.mark.points(2)
def test_lora_with_a_dropout_mask_matches_its_formula_and_finite_differences(student, rng):
    """lora_dropout drops the adapter input: delta = s (drop(x) lora_A^T) lora_B^T; dx goes back through the mask."""
    m = student["layer"]
    x, lora_A, lora_B = inputs(rng).values()
    mask = make_dropout_mask(rng, x.shape, 0.4, np.float64)
    delta, _ = m.lora_forward(x, lora_A, lora_B, 2.5, mask)
    np.testing.assert_allclose(delta, 2.5 * (x * mask) @ lora_A.T @ lora_B.T, rtol=1e-12, atol=1e-12)
    check_layer(
        lambda x, lora_A, lora_B: m.lora_forward(x, lora_A, lora_B, 2.5, mask),
        m.lora_backward,
        {"x": x, "lora_A": lora_A, "lora_B": lora_B},
        ("x", "lora_A", "lora_B"),
    ).assert_ok(TOL)


@pytest.mark.points(1)
def test_lora_keeps_float32_and_takes_a_layer_without_bias(student, rng):
    m = student["layer"]
    x, lora_A, lora_B = (value.astype(np.float32) for value in inputs(rng).values())
    delta, cache = m.lora_forward(x, lora_A, lora_B, 2.5)
    assert delta.dtype == np.float32, "float32 in, float32 out"
    assert all(g.dtype == np.float32 for g in m.lora_backward(np.ones_like(delta), cache)), (
        "float32 in, float32 out"
    )
    W = rng.standard_normal((6, 5)).astype(np.float32)
    adapted, _ = m.lora_linear_forward(x, W, None, lora_A, lora_B, 2.5)
    np.testing.assert_allclose(adapted, x @ W + 2.5 * x @ lora_A.T @ lora_B.T, rtol=1e-5, atol=1e-5)
