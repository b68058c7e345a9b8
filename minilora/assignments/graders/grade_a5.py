"""Grader for a5: the LoRA layer and merging.

Every part draws its inputs, its scale, its dropout rate and its upstream gradient from the part's
``rng``, and every array a call must leave alone is sent from here, so a submission that scales
lora_B or drops x in place is caught where it does so (see sandbox.py).
"""

import numpy as np
import pytest

from minilora.assignments.sandbox import counted
from minilora.gradcheck import check_layer
from minilora.layers import linear_forward, make_dropout_mask

TOL = 1e-7
B, T, C_in, C_out, R = 2, 4, 6, 5, 3  # x: (B, T, C_in), lora_A: (R, C_in), lora_B: (C_out, R)


def inputs(rng):
    return {
        "x": rng.standard_normal((B, T, C_in)),
        "lora_A": rng.standard_normal((R, C_in)),
        "lora_B": rng.standard_normal((C_out, R)),
    }


def draw_scaling(rng) -> float:
    """s far from 1: a scale forgotten in one gradient is then off by a factor of 1.5 or more."""
    return float(rng.uniform(1.5, 3.5))


def draw_mask(rng, dtype=np.float64):
    """lora_dropout's mask on x, at a drawn rate."""
    return make_dropout_mask(rng, (B, T, C_in), float(rng.uniform(0.2, 0.6)), dtype)


def draw_seed(rng) -> int:
    """The seed of a gradient check's random upstream gradient."""
    return int(rng.integers(2**31))


def adapter(x, lora_A, lora_B, s, mask=None):
    """The formula: delta = s (drop(x) lora_A^T) lora_B^T, in float64."""
    x_in = x if mask is None else x * mask
    return s * (x_in.astype(np.float64) @ lora_A.T.astype(np.float64)) @ lora_B.T.astype(np.float64)


@pytest.mark.points(1)
def test_lora_forward_on_drawn_inputs(student, rng):
    x, lora_A, lora_B = inputs(rng).values()
    s = draw_scaling(rng)
    delta, _ = student["layer"].lora_forward(x, lora_A, lora_B, s)
    np.testing.assert_allclose(delta, adapter(x, lora_A, lora_B, s), rtol=1e-12, atol=1e-12)


@pytest.mark.points(3)
def test_lora_backward_with_nonzero_lora_B_matches_finite_differences(student, rng):
    m, s = student["layer"], draw_scaling(rng)
    check_layer(
        lambda x, lora_A, lora_B: m.lora_forward(x, lora_A, lora_B, s),
        m.lora_backward,
        inputs(rng),
        ("x", "lora_A", "lora_B"),
        seed=draw_seed(rng),
    ).assert_ok(TOL)


@pytest.mark.points(1)
def test_at_zero_lora_B_only_lora_B_gets_a_gradient(student, rng):
    x, lora_A, lora_B = inputs(rng).values()
    _, cache = student["layer"].lora_forward(x, lora_A, np.zeros_like(lora_B), draw_scaling(rng))
    _, dlora_A, dlora_B = student["layer"].lora_backward(rng.standard_normal((B, T, C_out)), cache)
    assert np.all(dlora_A == 0) and np.count_nonzero(dlora_B) == dlora_B.size


@pytest.mark.points(2)
def test_merged_weight_gives_the_adapted_layer_output(student, rng):
    m, s = student["layer"], draw_scaling(rng)
    x, lora_A, lora_B = inputs(rng).values()
    W, b = rng.standard_normal((C_in, C_out)), rng.standard_normal(C_out)
    adapted, _ = m.lora_linear_forward(x, W, b, lora_A, lora_B, s)
    merged, _ = linear_forward(x, m.merge_weight(W, lora_A, lora_B, s), b)
    np.testing.assert_allclose(merged, adapted, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        merged - linear_forward(x, W, b)[0], adapter(x, lora_A, lora_B, s), rtol=1e-10, atol=1e-12
    )


@pytest.mark.points(2)
def test_lora_with_a_dropout_mask_matches_its_formula_and_finite_differences(student, rng):
    """lora_dropout drops the adapter input: delta = s (drop(x) lora_A^T) lora_B^T; dx goes back through the mask."""
    m, s = student["layer"], draw_scaling(rng)
    x, lora_A, lora_B = inputs(rng).values()
    mask = draw_mask(rng)
    delta, _ = m.lora_forward(x, lora_A, lora_B, s, mask)
    np.testing.assert_allclose(delta, adapter(x, lora_A, lora_B, s, mask), rtol=1e-12, atol=1e-12)
    check_layer(
        lambda x, lora_A, lora_B: m.lora_forward(x, lora_A, lora_B, s, mask),
        m.lora_backward,
        {"x": x, "lora_A": lora_A, "lora_B": lora_B},
        ("x", "lora_A", "lora_B"),
        seed=draw_seed(rng),
    ).assert_ok(TOL)


@pytest.mark.points(2)
def test_the_adapted_layer_with_dropout_gets_every_gradient_right_W_included(student, rng):
    """x feeds the base path and the adapter: the base's cache keeps x for dW, so x must come out unchanged."""
    m, s = student["layer"], draw_scaling(rng)
    mask = draw_mask(rng)
    values = {**inputs(rng), "W": rng.standard_normal((C_in, C_out)), "b": rng.standard_normal(C_out)}
    check_layer(
        lambda x, W, b, lora_A, lora_B: m.lora_linear_forward(x, W, b, lora_A, lora_B, s, mask),
        lambda dout, cache: m.lora_linear_backward(dout, cache, compute_dW=True),
        values,
        ("x", "W", "b", "lora_A", "lora_B"),
        seed=draw_seed(rng),
    ).assert_ok(TOL)


@pytest.mark.points(1)
def test_lora_never_forms_the_full_update_in_training(student, rng):
    """(x lora_A^T) lora_B^T costs N r (C_in + C_out); a (C_in, C_out) update costs N C_in C_out and more."""
    m = student["layer"]
    x, lora_A, lora_B = inputs(rng).values()
    (_, cache), forward = counted(m.lora_forward, x, lora_A, lora_B, draw_scaling(rng), draw_mask(rng))
    _, backward = counted(m.lora_backward, rng.standard_normal((B, T, C_out)), cache)
    full = [product for product in forward + backward if sorted(product[2]) == sorted((C_in, C_out))]
    assert not full, f"a (C_in, C_out) update was formed in training: products {full}"


@pytest.mark.points(1)
def test_lora_keeps_float32_and_takes_a_layer_without_bias(student, rng):
    m, s = student["layer"], draw_scaling(rng)
    x, lora_A, lora_B = (value.astype(np.float32) for value in inputs(rng).values())
    for mask in (None, draw_mask(rng, np.float32)):
        delta, cache = m.lora_forward(x, lora_A, lora_B, s, mask)
        assert delta.dtype == np.float32, "float32 in, float32 out"
        grads = m.lora_backward(rng.standard_normal(delta.shape).astype(np.float32), cache)
        assert all(g.dtype == np.float32 for g in grads), "float32 in, float32 gradients out"
    W = rng.standard_normal((C_in, C_out)).astype(np.float32)
    adapted, _ = m.lora_linear_forward(x, W, None, lora_A, lora_B, s)
    np.testing.assert_allclose(adapted, x @ W + adapter(x, lora_A, lora_B, s), rtol=1e-5, atol=1e-5)


@pytest.mark.points(1)
def test_merging_keeps_float32(student, rng):
    """A float32 update merged into a float32 W: a float64 update doubles the memory of every merged layer."""
    m, s = student["layer"], draw_scaling(rng)
    _, lora_A, lora_B = (value.astype(np.float32) for value in inputs(rng).values())
    W = rng.standard_normal((C_in, C_out)).astype(np.float32)
    update = m.lora_delta_weight(lora_A, lora_B, s)
    assert update.dtype == np.float32, f"float32 factors, a {update.dtype} update"
    np.testing.assert_allclose(update, s * lora_A.T.astype(np.float64) @ lora_B.T, rtol=1e-5, atol=1e-5)
    merged = m.merge_weight(W, lora_A, lora_B, s)
    assert merged.dtype == np.float32, f"float32 weight, a {merged.dtype} merged weight"
    np.testing.assert_allclose(merged, W + update, rtol=1e-6, atol=1e-6)
