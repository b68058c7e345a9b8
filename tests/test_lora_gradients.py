"""Every LoRA gradient path against finite differences in float64, and planted bugs that must fail."""

import numpy as np
import pytest

from minilora.config import GPTConfig
from minilora.gradcheck import GradCheckError, check_layer, check_model
from minilora.layers import make_dropout_mask
from minilora.lora.config import LoraConfig
from minilora.lora.layer import (
    lora_backward,
    lora_forward,
    lora_linear_backward,
    lora_linear_forward,
    lora_scaling,
)
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params

LAYER_TOL, MODEL_TOL = 1e-7, 1e-5
B, T, C_in, C_out, r = 2, 5, 6, 9, 3


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


def lora_inputs(rng, r=r, C_in=C_in, C_out=C_out):
    """Non-degenerate inputs: B != 0 (at B = 0, dA is exactly 0 and a check of A tests nothing)."""
    return {
        "x": rng.standard_normal((B, T, C_in)),
        "W": rng.standard_normal((C_in, C_out)),
        "b": rng.standard_normal(C_out),
        "lora_A": rng.standard_normal((r, C_in)),
        "lora_B": rng.standard_normal((C_out, r)),
    }


def test_lora_linear_gradients_match_finite_differences(rng):
    forward = lambda x, W, b, lora_A, lora_B: lora_linear_forward(x, W, b, lora_A, lora_B, 16 / r)  # noqa: E731
    result = check_layer(
        forward, lora_linear_backward, lora_inputs(rng), ("x", None, "b", "lora_A", "lora_B")
    )
    result.assert_ok(LAYER_TOL)


def test_lora_linear_with_weight_gradient_requested_matches_finite_differences(rng):
    forward = lambda x, W, b, lora_A, lora_B: lora_linear_forward(x, W, b, lora_A, lora_B, 2.0)  # noqa: E731
    backward = lambda dout, cache: lora_linear_backward(dout, cache, compute_dW=True)  # noqa: E731
    result = check_layer(forward, backward, lora_inputs(rng), ("x", "W", "b", "lora_A", "lora_B"))
    result.assert_ok(LAYER_TOL)


def test_lora_with_a_fixed_dropout_mask_matches_finite_differences(rng):
    mask = make_dropout_mask(np.random.default_rng(5), (B, T, C_in), 0.3, np.float64)
    inputs = lora_inputs(rng)
    del inputs["W"], inputs["b"]
    forward = lambda x, lora_A, lora_B: lora_forward(x, lora_A, lora_B, 1.5, mask)  # noqa: E731
    result = check_layer(forward, lora_backward, inputs, ("x", "lora_A", "lora_B"))
    result.assert_ok(LAYER_TOL)


def test_rslora_scaling_matches_finite_differences(rng):
    scaling = lora_scaling(r, 16, use_rslora=True)
    assert scaling == pytest.approx(16 / np.sqrt(r))
    forward = lambda x, W, b, lora_A, lora_B: lora_linear_forward(x, W, b, lora_A, lora_B, scaling)  # noqa: E731
    result = check_layer(
        forward, lora_linear_backward, lora_inputs(rng), ("x", None, "b", "lora_A", "lora_B")
    )
    result.assert_ok(LAYER_TOL)


def test_at_default_init_dA_is_zero_and_dB_is_not(rng):
    x = rng.standard_normal((B, T, C_in))
    lora_A, lora_B = rng.uniform(-0.4, 0.4, (r, C_in)), np.zeros((C_out, r))
    delta, cache = lora_forward(x, lora_A, lora_B, 2.0)
    assert np.all(delta == 0)  # the adapted layer starts exactly at the base
    _, dA, dB = lora_backward(rng.standard_normal((B, T, C_out)), cache)
    assert np.all(dA == 0)
    assert np.count_nonzero(dB) == dB.size


def lora_backward_missing_scale(ddelta, cache):
    dx, dA, dB = lora_backward(ddelta, cache)
    return dx, dA, dB / cache.scaling  # bug: dB forgets the factor s


def lora_backward_transposed_factor(ddelta, cache):
    dx, dA, dB = lora_backward(ddelta, cache)
    return dx, dA.T, dB  # bug: dA handed back as (C_in, r)^T of the right thing


def test_missing_scale_in_lora_backward_fails_the_check(rng):
    inputs = lora_inputs(rng)
    del inputs["W"], inputs["b"]
    forward = lambda x, lora_A, lora_B: lora_forward(x, lora_A, lora_B, 4.0)  # noqa: E731
    result = check_layer(forward, lora_backward_missing_scale, inputs, ("x", "lora_A", "lora_B"))
    assert result.errors()["lora_A"] < LAYER_TOL
    with pytest.raises(GradCheckError, match="'lora_B'"):
        result.assert_ok(LAYER_TOL)


@pytest.mark.parametrize("square", [True, False])
def test_transposed_factor_in_lora_backward_fails_the_check(rng, square):
    size = 4 if square else C_in  # square: same shape, wrong values; otherwise a shape mismatch
    inputs = lora_inputs(rng, r=size if square else r, C_in=size)
    del inputs["W"], inputs["b"]
    forward = lambda x, lora_A, lora_B: lora_forward(x, lora_A, lora_B, 2.0)  # noqa: E731
    with pytest.raises(GradCheckError, match="lora_A"):
        check_layer(forward, lora_backward_transposed_factor, inputs, ("x", "lora_A", "lora_B")).assert_ok(
            LAYER_TOL
        )


@pytest.mark.parametrize(
    "lora_config",
    [
        LoraConfig(r=2, target_modules="all-linear", init="random", lora_dropout=0.2, bias="lora_only"),
        LoraConfig(
            r=3,
            lora_alpha=5,
            target_modules=("c_attn", "mlp.c_proj"),
            init="random",
            use_rslora=True,
            layers_to_transform=[1],
            bias="all",
        ),
    ],
)
def test_whole_tiny_model_with_lora_has_only_adapter_gradients_and_they_are_right(lora_config):
    config = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=7, dropout=0.1)
    params = init_params(config, seed=0, dtype=np.float64)
    rng = np.random.default_rng(1)
    for value in params.values():
        value += 0.1 * rng.standard_normal(value.shape)
    model = add_lora(GPT(config, params), lora_config, seed=3)
    idx, targets = rng.integers(0, 7, (2, 5)), rng.integers(0, 7, (2, 5))
    result = check_model(model, idx, targets, mode="elementwise", dropout_seed=9)
    checked = {check.name for check in result.checks}
    assert checked == set(model.adapter_keys)
    assert all(name.endswith((".lora_A", ".lora_B", ".bias")) for name in checked)
    result.assert_ok(MODEL_TOL)
