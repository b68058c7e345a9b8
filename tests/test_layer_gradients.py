"""Every layer's backward against central finite differences, element by element, in float64.

Inputs are deliberately non-degenerate: non-zero biases and LayerNorm gains away from 1, T > 1,
two heads, and dropout with p > 0 and a fixed mask, so that no term of a backward can hide.
"""

import numpy as np
import pytest

from minilora.gradcheck import check_layer
from minilora.layers import (
    AttentionCache,
    attention_backward,
    attention_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    make_dropout_mask,
)
from minilora.layers.attention import scaled_dot_product_attention, scaled_dot_product_attention_backward

LAYER_TOL = 1e-7
B, T, C, H, V = 2, 5, 8, 2, 11


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_linear_backward_matches_finite_differences(rng):
    inputs = {
        "x": rng.standard_normal((B, T, C)),
        "W": rng.standard_normal((C, 3 * C)),
        "b": rng.standard_normal(3 * C),
    }
    result = check_layer(linear_forward, linear_backward, inputs, ("x", "W", "b"))
    result.assert_ok(LAYER_TOL)


def test_linear_backward_without_bias_matches_finite_differences(rng):
    inputs = {"x": rng.standard_normal((B, T, C)), "W": rng.standard_normal((C, 2 * C))}
    result = check_layer(linear_forward, linear_backward, inputs, ("x", "W", None))
    result.assert_ok(LAYER_TOL)


def test_linear_backward_skips_frozen_weight_gradient(rng):
    x, W, b = rng.standard_normal((B, T, C)), rng.standard_normal((C, C)), rng.standard_normal(C)
    out, cache = linear_forward(x, W, b)
    dx, dW, db = linear_backward(np.ones_like(out), cache, compute_dW=False)
    assert dW is None
    assert dx.shape == x.shape and db.shape == b.shape


def test_embedding_backward_matches_finite_differences_with_repeated_ids(rng):
    ids = np.array([[1, 3, 3, 0, 3], [2, 1, 7, 7, 0]])  # repeated ids: the scatter-add case
    inputs = {"ids": ids, "table": rng.standard_normal((V, C))}
    result = check_layer(embedding_forward, embedding_backward, inputs, ("table",))
    result.assert_ok(LAYER_TOL)


def test_embedding_backward_sums_repeated_ids(rng):
    ids = np.array([[4, 4, 4]])
    _, cache = embedding_forward(ids, rng.standard_normal((V, C)))
    dtable = embedding_backward(np.ones((1, 3, C)), cache)
    np.testing.assert_array_equal(dtable[4], np.full(C, 3.0))
    assert np.count_nonzero(dtable) == C


def test_layernorm_backward_matches_finite_differences(rng):
    inputs = {
        "x": 2.0 + 3.0 * rng.standard_normal((B, T, C)),
        "w": 1.0 + 0.5 * rng.standard_normal(C),
        "b": rng.standard_normal(C),
    }
    result = check_layer(layernorm_forward, layernorm_backward, inputs, ("x", "w", "b"))
    result.assert_ok(LAYER_TOL)


def test_gelu_backward_matches_finite_differences(rng):
    inputs = {"x": 2.0 * rng.standard_normal((B, T, 4 * C))}
    result = check_layer(gelu_forward, gelu_backward, inputs, ("x",))
    result.assert_ok(LAYER_TOL)


def test_attention_backward_matches_finite_differences(rng):
    inputs = {"qkv": rng.standard_normal((B, T, 3 * C))}
    result = check_layer(lambda qkv: attention_forward(qkv, H), attention_backward, inputs, ("qkv",))
    result.assert_ok(LAYER_TOL)


def test_attention_backward_with_dropout_mask_matches_finite_differences(rng):
    mask = make_dropout_mask(np.random.default_rng(7), (B, H, T, T), 0.3, np.float64)
    assert 0 < np.count_nonzero(mask) < mask.size
    inputs = {"qkv": rng.standard_normal((B, T, 3 * C))}
    result = check_layer(lambda qkv: attention_forward(qkv, H, mask), attention_backward, inputs, ("qkv",))
    result.assert_ok(LAYER_TOL)


def test_attention_is_causal(rng):
    qkv = rng.standard_normal((B, T, 3 * C))
    changed = qkv.copy()
    changed[:, -1] += 1.0  # change only the last position
    y, _ = attention_forward(qkv, H)
    y_changed, _ = attention_forward(changed, H)
    np.testing.assert_array_equal(y[:, :-1], y_changed[:, :-1])
    assert not np.allclose(y[:, -1], y_changed[:, -1])


def sdpa_layer(q, k, v, dropout_mask):
    """attention.py's shared core as a forward/backward layer: (y, cache)."""
    y, q_scaled, att, scale = scaled_dot_product_attention(q, k, v, dropout_mask)
    return y, AttentionCache(q=q_scaled, k=k, v=v, att=att, dropout_mask=dropout_mask, scale=scale)


def sdpa_layer_backward(dy, cache):
    """dq, dk, dv; a broadcast key/value head gets the sum of its query heads' gradients."""
    dq, dk, dv = scaled_dot_product_attention_backward(dy, cache)
    if cache.k.shape[1] == 1:
        dk, dv = dk.sum(axis=1, keepdims=True), dv.sum(axis=1, keepdims=True)
    return dq, dk, dv


@pytest.mark.parametrize("kv_heads", [3, 1])  # 1: one key/value head broadcast to all 3, as GQA uses it
def test_the_shared_attention_core_and_its_softmax_backward_match_finite_differences(rng, kv_heads):
    q = rng.standard_normal((B, 3, T, C))
    k, v = (rng.standard_normal((B, kv_heads, T, C)) for _ in range(2))
    mask = make_dropout_mask(np.random.default_rng(5), (B, 3, T, T), 0.3, np.float64)
    inputs = {"q": q, "k": k, "v": v, "dropout_mask": mask}
    result = check_layer(sdpa_layer, sdpa_layer_backward, inputs, ("q", "k", "v"))
    result.assert_ok(LAYER_TOL)


def test_dropout_backward_matches_finite_differences(rng):
    mask = make_dropout_mask(np.random.default_rng(3), (B, T, C), 0.25, np.float64)
    inputs = {"x": rng.standard_normal((B, T, C)), "mask": mask}
    result = check_layer(dropout_forward, dropout_backward, inputs, ("x",))
    result.assert_ok(LAYER_TOL)


def test_dropout_mask_keeps_expected_fraction_and_scales():
    mask = make_dropout_mask(np.random.default_rng(0), (200, 500), 0.2, np.float32)
    assert mask.dtype == np.float32
    assert set(np.unique(mask)) == {np.float32(0.0), np.float32(1.25)}
    assert abs(np.mean(mask == 0) - 0.2) < 0.01


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_dropout_mask_rejects_probability_outside_unit_interval(p):
    with pytest.raises(ValueError, match="dropout probability"):
        make_dropout_mask(np.random.default_rng(0), (2,), p, np.float32)


def test_cross_entropy_backward_matches_finite_differences(rng):
    targets = rng.integers(0, V, (B, T))
    inputs = {"logits": 3.0 * rng.standard_normal((B, T, V)), "targets": targets}
    result = check_layer(cross_entropy_forward, cross_entropy_backward, inputs, ("logits",))
    result.assert_ok(LAYER_TOL)


def test_cross_entropy_equals_negative_log_softmax_computed_directly(rng):
    logits, targets = rng.standard_normal((B, T, V)), rng.integers(0, V, (B, T))
    loss, _ = cross_entropy_forward(logits, targets)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -np.mean(np.log(np.take_along_axis(probs, targets[..., None], -1)))
    assert float(loss) == pytest.approx(expected, rel=1e-12)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]])
    loss, cache = cross_entropy_forward(logits, np.array([0]))
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.isfinite(cross_entropy_backward(1.0, cache)))


def test_a_cache_made_before_reloading_a_layer_module_still_goes_back_through_its_backward():
    """A notebook's importlib.reload makes new cache classes; a backward reads attributes, never types.

    The reload is simulated by executing each module's file again as a new module, which leaves the
    real modules (and the other tests) untouched.
    """
    import importlib.util

    import minilora.layers.gelu as gelu
    import minilora.layers.layernorm as layernorm

    def reloaded(module):
        spec = importlib.util.spec_from_file_location(f"{module.__name__}_reloaded", module.__file__)
        fresh = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fresh)
        return fresh

    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((3, 8)), rng.standard_normal(8), rng.standard_normal(8)
    dout = rng.standard_normal((3, 8))
    gelu_cache, ln_cache = gelu.gelu_forward(x)[1], layernorm.layernorm_forward(x, w, b)[1]
    new_gelu, new_layernorm = reloaded(gelu), reloaded(layernorm)
    assert new_gelu.GeluCache is not gelu.GeluCache  # the cache class was made anew
    np.testing.assert_array_equal(
        new_gelu.gelu_backward(dout, gelu_cache), gelu.gelu_backward(dout, gelu_cache)
    )
    want = layernorm.layernorm_backward(dout, ln_cache)
    for got, expected in zip(new_layernorm.layernorm_backward(dout, ln_cache), want):
        np.testing.assert_array_equal(got, expected)
