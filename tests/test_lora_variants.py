"""DoRA, PiSSA and several adapters on one base: gradients, starting points, merging, conversion."""

from collections import Counter

import numpy as np
import pytest

from minilora.config import GPTConfig
from minilora.gradcheck import check_layer, check_model
from minilora.io.adapters import load_adapter, save_adapter
from minilora.lora.config import LoraConfig
from minilora.lora.dora import dora_linear_backward, dora_linear_forward, dora_weight_norm
from minilora.lora.layer import lora_forward
from minilora.lora.model import add_lora
from minilora.lora.variants import FACTORS, MAGNITUDE, DoraVariant, LoraVariant, variant_for
from minilora.model import GPT, init_params

LAYER_TOL, MODEL_TOL = 1e-7, 1e-5
CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=7)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def dora_inputs(rng, C_in=6, C_out=5, r=3):
    return {
        "x": rng.standard_normal((2, 4, C_in)),
        "W": rng.standard_normal((C_in, C_out)),
        "b": rng.standard_normal(C_out),
        "lora_A": rng.standard_normal((r, C_in)),
        "lora_B": rng.standard_normal((C_out, r)),
        "magnitude": 1.0 + rng.random(C_out),
    }


def base_model(seed=0, config=CONFIG):
    params = init_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for value in params.values():
        value += 0.2 * rng.standard_normal(value.shape)
    return GPT(config, params)


def batch(seed=0, config=CONFIG):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (2, 5)), rng.integers(0, config.vocab_size, (2, 5))


def test_dora_backward_with_the_norm_held_constant_matches_finite_differences(rng):
    inputs = dora_inputs(rng)
    norm = dora_weight_norm(inputs["W"], inputs["lora_A"], inputs["lora_B"], 2.0)  # held at its current value

    def forward(x, W, b, lora_A, lora_B, magnitude):
        return dora_linear_forward(x, W, b, lora_A, lora_B, magnitude, 2.0, weight_norm=norm)

    result = check_layer(forward, dora_linear_backward, inputs, ("x", "b", "lora_A", "lora_B", "magnitude"))
    result.assert_ok(LAYER_TOL)


def test_dora_exact_backward_through_the_norm_matches_finite_differences(rng):
    def forward(x, W, b, lora_A, lora_B, magnitude):
        return dora_linear_forward(x, W, b, lora_A, lora_B, magnitude, 2.0, exact_norm_gradient=True)

    result = check_layer(
        forward, dora_linear_backward, dora_inputs(rng), ("x", "b", "lora_A", "lora_B", "magnitude")
    )
    result.assert_ok(LAYER_TOL)


def test_detached_and_exact_dora_gradients_differ_only_for_the_factors(rng):
    inputs = dora_inputs(rng)
    dout = rng.standard_normal((2, 4, 5))
    _, detached = dora_linear_forward(*inputs.values(), 2.0)
    _, exact = dora_linear_forward(*inputs.values(), 2.0, exact_norm_gradient=True)
    dx_d, db_d, dA_d, dB_d, dm_d = dora_linear_backward(dout, detached)
    dx_e, db_e, dA_e, dB_e, dm_e = dora_linear_backward(dout, exact)
    np.testing.assert_array_equal(dx_d, dx_e)
    np.testing.assert_array_equal(dm_d, dm_e)
    assert np.max(np.abs(dA_d - dA_e)) / np.max(np.abs(dA_e)) > 1e-2  # the norm's share is not small
    assert np.max(np.abs(dB_d - dB_e)) / np.max(np.abs(dB_e)) > 1e-2
    # and the detached gradient is not the gradient of the function that recomputes the norm:
    result = check_layer(
        lambda **kw: dora_linear_forward(*kw.values(), 2.0),
        dora_linear_backward,
        inputs,
        ("x", "b", "lora_A", "lora_B", "magnitude"),
    )
    assert result.errors()["lora_A"] > 1e-3 and result.errors()["magnitude"] < LAYER_TOL


def test_whole_model_with_exact_dora_matches_finite_differences():
    model = add_lora(
        base_model(),
        LoraConfig(
            r=2,
            target_modules="all-linear",
            init="random",
            use_dora=True,
            dora_exact_gradient=True,
            bias="lora_only",
        ),
        seed=1,
    )
    idx, targets = batch()
    result = check_model(model, idx, targets, mode="elementwise")
    assert {c.name for c in result.checks} == set(model.trainable_names)
    assert any(name.endswith(".lora_magnitude_vector") for name in model.trainable_names)
    result.assert_ok(MODEL_TOL)


def test_dora_at_default_init_starts_at_the_base():
    base = base_model()
    idx, _ = batch()
    model = add_lora(base, LoraConfig(r=2, target_modules="all-linear", use_dora=True))
    np.testing.assert_allclose(model.forward(idx)[0], base.forward(idx)[0], rtol=0, atol=1e-13)


def test_dora_merge_matches_unmerged_and_unmerge_restores_the_base():
    base = base_model()
    original = {name: value.copy() for name, value in base.params.items()}
    model = add_lora(base, LoraConfig(r=2, target_modules="all-linear", init="random", use_dora=True), seed=2)
    for name in model.trainable_names:
        if name.endswith("magnitude_vector"):
            model.params[name] *= 1.3  # magnitudes that have moved
    idx, _ = batch()
    unmerged = model.forward(idx)[0]
    model.merge()
    np.testing.assert_allclose(model.forward(idx)[0], unmerged, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.merge_and_unload().forward(idx)[0], unmerged, rtol=1e-10, atol=1e-12)
    model.unmerge()
    for name, value in original.items():
        np.testing.assert_allclose(base.params[name], value, rtol=0, atol=1e-12)


def test_pissa_starts_at_the_base_with_the_best_rank_r_part_in_the_factors():
    base = base_model()
    original = {name: value.copy() for name, value in base.params.items()}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=("c_attn",), init="pissa")
    model = add_lora(base, config)
    idx, _ = batch()
    np.testing.assert_allclose(model.forward(idx)[0], base.forward(idx)[0], rtol=0, atol=1e-12)
    for m in model.adapted_modules:
        W = original[f"{m}.weight"]
        update = config.scaling * model.params[f"{m}.lora_A"].T @ model.params[f"{m}.lora_B"].T
        S = np.linalg.svd(W, compute_uv=False)
        assert np.linalg.matrix_rank(update) == 2
        # Eckart-Young: the residual of the best rank-2 approximation has the energy of the other singular values
        assert np.sum((W - update) ** 2) == pytest.approx(np.sum(S[2:] ** 2), rel=1e-10)
        np.testing.assert_allclose(model.params[f"{m}.weight"], W - update, atol=1e-12)
    for name, value in original.items():
        np.testing.assert_array_equal(base.params[name], value)  # the base itself is untouched


def test_pissa_gradients_match_finite_differences():
    model = add_lora(base_model(), LoraConfig(r=2, target_modules="all-linear", init="pissa"))
    idx, targets = batch()
    check_model(model, idx, targets, mode="elementwise").assert_ok(MODEL_TOL)


def test_pissa_saves_as_a_rank_2r_lora_against_the_original_base(tmp_path):
    base = base_model()
    model = add_lora(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init="pissa"))
    rng = np.random.default_rng(3)
    for name in model.trainable_names:
        model.params[name] += 0.1 * rng.standard_normal(model.params[name].shape)  # as if trained
    idx, _ = batch()
    trained = model.forward(idx)[0]
    save_adapter(model, tmp_path)
    loaded = load_adapter(base, tmp_path)
    assert loaded.lora_config.r == 4 and loaded.lora_config.init == "default"
    assert loaded.base_fingerprint == model.base_fingerprint
    np.testing.assert_allclose(loaded.forward(idx)[0], trained, rtol=1e-10, atol=1e-12)
    loaded.merge()
    loaded.unmerge()
    np.testing.assert_allclose(loaded.forward(idx)[0], trained, rtol=1e-10, atol=1e-12)


def test_dora_adapter_round_trips_through_a_file(tmp_path):
    base = base_model()
    model = add_lora(base, LoraConfig(r=2, target_modules="all-linear", init="random", use_dora=True))
    save_adapter(model, tmp_path)
    idx, _ = batch()
    loaded = load_adapter(base, tmp_path)
    assert loaded.lora_config.use_dora
    np.testing.assert_array_equal(loaded.forward(idx)[0], model.forward(idx)[0])


def test_adapters_switch_disable_and_delete():
    base = base_model()
    idx, _ = batch()
    model = add_lora(base, LoraConfig(r=2, init="random"), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=3, target_modules="all-linear", init="random"), seed=5)
    out_first = model.forward(idx)[0]
    model.set_adapter("second")
    out_second = model.forward(idx)[0]
    assert not np.allclose(out_first, out_second)
    assert all(name in model.adapters["second"].trainable for name in model.trainable_names)
    with model.disable_adapter():
        np.testing.assert_array_equal(model.forward(idx)[0], base.forward(idx)[0])
    np.testing.assert_array_equal(model.forward(idx)[0], out_second)
    model.set_adapter("first")
    np.testing.assert_array_equal(model.forward(idx)[0], out_first)
    model.delete_adapter("first")
    assert model.active_adapter is None and list(model.adapters) == ["second"]
    np.testing.assert_array_equal(model.forward(idx)[0], base.forward(idx)[0])
    with pytest.raises(KeyError, match="no adapter named 'first'"):
        model.set_adapter("first")


def test_switching_while_merged_is_refused():
    model = add_lora(base_model(), LoraConfig(r=2, init="random"))
    model.add_adapter("other", LoraConfig(r=2))
    model.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        model.set_adapter("other")


def test_combined_adapter_output_equals_the_weighted_sum_of_the_deltas():
    base = base_model()
    model = add_lora(base, LoraConfig(r=2, lora_alpha=3, init="random"), adapter_name="a", seed=1)
    model.add_adapter(
        "b",
        LoraConfig(r=3, lora_alpha=5, target_modules="all-linear", init="random", use_rslora=True),
        seed=2,
    )
    weights = (0.7, -1.5)
    model.combine_adapters(["a", "b"], weights, "ab")
    combined = model.adapters["ab"]
    assert combined.config.r == 5
    rng = np.random.default_rng(4)
    for m, (C_in, C_out) in combined.modules.items():
        x = rng.standard_normal((2, 5, C_in))
        expected = np.zeros((2, 5, C_out))
        for name, w in zip(("a", "b"), weights):
            part = model.adapters[name]
            if m in part.modules:
                expected += (
                    w
                    * lora_forward(
                        x, part.tensors[f"{m}.lora_A"], part.tensors[f"{m}.lora_B"], part.config.scaling
                    )[0]
                )
        got = lora_forward(
            x, combined.tensors[f"{m}.lora_A"], combined.tensors[f"{m}.lora_B"], combined.config.scaling
        )[0]
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_only_plain_adapters_combine():
    model = add_lora(base_model(), LoraConfig(r=2, init="random", use_dora=True), adapter_name="d")
    model.add_adapter("p", LoraConfig(r=2, init="random"))
    with pytest.raises(ValueError, match="'d' is not plain LoRA"):
        model.combine_adapters(["d", "p"], [1.0, 1.0], "dp")


def test_dora_with_pissa_is_refused():
    with pytest.raises(ValueError, match="choose one variant"):
        LoraConfig(use_dora=True, init="pissa")


# The variant objects: what LoraGPT asks to run, differentiate and merge one adapted layer.


@pytest.mark.parametrize(
    "lora_config, variant_type, exact",
    [
        (LoraConfig(), LoraVariant, None),
        (LoraConfig(init="pissa"), LoraVariant, None),  # PiSSA is a start, not another layer
        (LoraConfig(use_dora=True), DoraVariant, False),
        (LoraConfig(use_dora=True, dora_exact_gradient=True), DoraVariant, True),
    ],
)
def test_variant_for_picks_the_class_the_config_asks_for(lora_config, variant_type, exact):
    variant = variant_for(lora_config)
    assert type(variant) is variant_type
    if exact is not None:
        assert variant.exact_norm_gradient is exact
    model = add_lora(base_model(), lora_config)
    assert type(model.adapter.variant) is variant_type


def variant_inputs(rng, C_in=6, C_out=5, r=3):
    inputs = dora_inputs(rng, C_in, C_out, r)  # a non-zero lora_B, so that dlora_A is not trivially 0
    inputs[MAGNITUDE] = inputs.pop("magnitude")
    return inputs


def variant_layer(variant, suffixes, scaling=2.0, dropout_mask=None):
    """check_layer's forward(**inputs), and backward(dout, cache) -> (dx, db, the grads of ``suffixes``)."""

    def forward(x, W, b, **tensors):
        y, cache, _ = variant.forward(x, W, b, tensors, scaling, dropout_mask)  # and the backward to use
        return y, cache

    def backward(dout, cache):
        dx, grads = variant.backward(dout, cache)
        assert set(grads) == {"bias", *variant.suffixes}
        return (dx, grads["bias"], *(grads[suffix] for suffix in suffixes))

    return forward, backward


@pytest.mark.parametrize("with_dropout", [False, True])
def test_lora_variant_backward_matches_finite_differences(rng, with_dropout):
    inputs = variant_inputs(rng)
    del inputs[MAGNITUDE]
    mask = (rng.random((2, 4, 6)) > 0.3) / 0.7 if with_dropout else None
    forward, backward = variant_layer(LoraVariant(), FACTORS, dropout_mask=mask)
    check_layer(forward, backward, inputs, ("x", "b", *FACTORS)).assert_ok(LAYER_TOL)


def test_exact_dora_variant_backward_matches_finite_differences(rng):
    mask = (rng.random((2, 4, 6)) > 0.3) / 0.7
    suffixes = DoraVariant.suffixes
    forward, backward = variant_layer(DoraVariant(exact_norm_gradient=True), suffixes, dropout_mask=mask)
    check_layer(forward, backward, variant_inputs(rng), ("x", "b", *suffixes)).assert_ok(LAYER_TOL)


def test_detached_dora_variant_is_exact_for_x_bias_and_magnitude_and_holds_the_norm_for_the_factors(rng):
    inputs = variant_inputs(rng)
    forward, backward = variant_layer(DoraVariant(), (MAGNITUDE,))
    check_layer(forward, backward, inputs, ("x", "b", MAGNITUDE)).assert_ok(LAYER_TOL)  # n depends on none
    x, W, b, lora_A, lora_B, m = inputs.values()
    dout = rng.standard_normal((2, 4, 5))
    _, grads = DoraVariant().backward(dout, forward(**inputs)[1])
    norm = dora_weight_norm(W, lora_A, lora_B, 2.0)
    _, held = dora_linear_forward(x, W, b, lora_A, lora_B, m, 2.0, weight_norm=norm)
    _, _, dlora_A, dlora_B, _ = dora_linear_backward(dout, held)
    np.testing.assert_array_equal(grads["lora_A"], dlora_A)  # the norm held constant, checked above
    np.testing.assert_array_equal(grads["lora_B"], dlora_B)


@pytest.mark.parametrize("variant", [LoraVariant(), DoraVariant()], ids=lambda v: v.name)
def test_variant_merge_gives_the_adapted_output_and_unmerge_restores_the_weight(rng, variant):
    inputs = variant_inputs(rng)
    x, W, b = inputs.pop("x"), inputs.pop("W"), inputs.pop("b")
    tensors = {suffix: inputs[suffix] for suffix in variant.suffixes}
    adapted, _, _ = variant.forward(x, W, b, tensors, 2.0)
    merged, undo = variant.merge(W, tensors, 2.0)
    np.testing.assert_allclose(x @ merged + b, adapted, rtol=1e-12, atol=1e-12)
    assert not np.allclose(merged, W)
    np.testing.assert_allclose(variant.unmerge(merged, tensors, 2.0, undo), W, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", [LoraVariant(), DoraVariant()], ids=lambda v: v.name)
def test_variant_backward_returns_no_bias_gradient_for_a_frozen_or_missing_bias(rng, variant):
    inputs = variant_inputs(rng)
    tensors = {suffix: inputs[suffix] for suffix in variant.suffixes}
    dout = rng.standard_normal((2, 4, 5))
    _, with_bias, _ = variant.forward(inputs["x"], inputs["W"], inputs["b"], tensors, 2.0)
    _, without_bias, _ = variant.forward(inputs["x"], inputs["W"], None, tensors, 2.0)
    assert set(variant.backward(dout, with_bias, compute_db=False)[1]) == set(variant.suffixes)
    assert set(variant.backward(dout, without_bias)[1]) == set(variant.suffixes)


def test_the_model_runs_every_adapted_layer_through_its_adapters_variant():
    calls = Counter()

    class CountingVariant(DoraVariant):
        def forward(self, *args, **kwargs):
            calls["forward"] += 1
            return super().forward(*args, **kwargs)

        def backward(self, *args, **kwargs):
            calls["backward"] += 1
            return super().backward(*args, **kwargs)

        def merge(self, *args, **kwargs):
            calls["merge"] += 1
            return super().merge(*args, **kwargs)

        def unmerge(self, *args, **kwargs):
            calls["unmerge"] += 1
            return super().unmerge(*args, **kwargs)

    model = add_lora(
        base_model(), LoraConfig(r=2, target_modules=("c_attn", "mlp.c_fc"), init="random", use_dora=True)
    )
    model.adapter.variant = CountingVariant()
    idx, targets = batch()
    grads = model.backward(model.forward(idx, targets)[2])
    model.merge()
    model.unmerge()
    n = len(model.adapted_modules)
    assert dict(calls) == {"forward": n, "backward": n, "merge": n, "unmerge": n}
    assert {name.rsplit(".", 1)[1] for name in grads} == set(DoraVariant.suffixes)
