"""The GPT-2 model: names and shapes, initialisation, whole-model gradients, freezing, bad input."""

from dataclasses import replace

import numpy as np
import pytest

from minilora.config import PRESETS, GPTConfig, get_preset
from minilora.gradcheck import check_model
from minilora.layers import REFERENCE_OPS, linear_backward
from minilora.model import GPT, init_params

MODEL_TOL = 1e-5


def perturbed_model(config, seed=0, frozen=()):
    """A float64 model moved away from its init (non-zero biases, gains != 1), so no term hides."""
    params = init_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for value in params.values():
        value += 0.1 * rng.standard_normal(value.shape)
    return GPT(config, params, frozen=frozen)


def random_batch(config, B=2, T=None, seed=0):
    rng = np.random.default_rng(seed)
    T = T or config.block_size
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


def test_parameter_names_and_shapes_follow_hugging_face_gpt2():
    shapes = get_preset("tiny").parameter_shapes()
    C = 64
    assert shapes["transformer.wte.weight"] == (256, C)
    assert shapes["transformer.wpe.weight"] == (64, C)
    assert shapes["transformer.h.1.attn.c_attn.weight"] == (C, 3 * C)
    assert shapes["transformer.h.1.attn.c_attn.bias"] == (3 * C,)
    assert shapes["transformer.h.0.attn.c_proj.weight"] == (C, C)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (C, 4 * C)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (4 * C, C)
    assert shapes["transformer.ln_f.bias"] == (C,)
    assert len(shapes) == 2 + 2 * 12 + 2


def test_config_without_bias_has_no_bias_parameters():
    shapes = get_preset("tiny", bias=False).parameter_shapes()
    assert not any(name.endswith(".bias") for name in shapes)


def test_preset_parameter_counts_match_the_gpt2_formula():
    for config in PRESETS.values():
        C, L, V, T = config.n_embd, config.n_layer, config.vocab_size, config.block_size
        per_block = (
            12 * C * C + 13 * C
        )  # c_attn 3C^2+3C, c_proj C^2+C, c_fc 4C^2+4C, mlp c_proj 4C^2+C, two LNs 4C
        expected = V * C + T * C + L * per_block + 2 * C
        assert sum(int(np.prod(s)) for s in config.parameter_shapes().values()) == expected


def test_init_follows_gpt2_statistics():
    config = get_preset("medium")
    params = init_params(config, seed=0)
    assert all(value.dtype == np.float32 for value in params.values())
    assert np.std(params["transformer.h.0.attn.c_attn.weight"]) == pytest.approx(0.02, rel=0.02)
    residual_std = 0.02 / np.sqrt(2 * config.n_layer)
    assert np.std(params["transformer.h.3.mlp.c_proj.weight"]) == pytest.approx(residual_std, rel=0.02)
    assert np.all(params["transformer.h.0.ln_1.weight"] == 1) and np.all(
        params["transformer.h.0.mlp.c_fc.bias"] == 0
    )


def test_init_is_reproducible_from_the_seed():
    config = get_preset("tiny")
    a, b, c = init_params(config, seed=3), init_params(config, seed=3), init_params(config, seed=4)
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert not np.array_equal(a["transformer.wte.weight"], c["transformer.wte.weight"])


def test_every_parameter_of_a_small_model_matches_finite_differences_elementwise():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=7, dropout=0.1)
    model = perturbed_model(config)
    idx, targets = random_batch(config, B=2, T=5)
    result = check_model(model, idx, targets, mode="elementwise", dropout_seed=11)
    assert {check.name for check in result.checks} == set(model.params)
    result.assert_ok(MODEL_TOL)


@pytest.mark.parametrize("mode", ["direction", "coordinates"])
def test_tiny_preset_gradients_match_finite_differences(mode):
    config = get_preset("tiny", dropout=0.1)
    model = perturbed_model(config)
    idx, targets = random_batch(config, B=2, T=16)
    result = check_model(model, idx, targets, mode=mode, n_samples=4, dropout_seed=5)
    result.assert_ok(MODEL_TOL)


def test_dropout_changes_training_loss_but_not_evaluation():
    config = get_preset("tiny", dropout=0.2)
    model = perturbed_model(config)
    idx, targets = random_batch(config, T=16)
    eval_a, eval_b = (float(model.forward(idx, targets)[1]) for _ in range(2))
    train = float(model.forward(idx, targets, dropout_rng=np.random.default_rng(0))[1])
    assert eval_a == eval_b and train != eval_a


def test_frozen_parameters_get_no_gradients_and_frozen_weights_no_weight_product():
    config = get_preset("tiny")
    frozen = [name for name in config.parameter_shapes() if not name.startswith("transformer.h.1.")]
    model = perturbed_model(config, frozen=frozen)
    weight_products = []  # (C_in, C_out) of every weight gradient actually computed

    def spy(dout, cache, compute_dW=True, compute_db=True):
        dx, dW, db = linear_backward(dout, cache, compute_dW, compute_db)
        if dW is not None:
            weight_products.append(dW.shape)
        return dx, dW, db

    model.ops = replace(REFERENCE_OPS, name="spy", linear_backward=spy)  # the model's layer-function seam
    idx, targets = random_batch(config, T=8)
    grads = model.backward(model.forward(idx, targets)[2])
    assert set(grads) == set(model.trainable_names)
    assert all(name.startswith("transformer.h.1.") for name in grads)
    C = config.n_embd
    assert sorted(weight_products) == sorted([(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)])  # block 1 only


def test_loss_at_init_is_close_to_uniform_prediction():
    config = get_preset("small")
    model = GPT(config, init_params(config, seed=0))
    idx, targets = random_batch(config, T=32)
    assert float(model.forward(idx, targets)[1]) == pytest.approx(np.log(256), rel=0.02)


def test_forward_rejects_token_ids_outside_the_vocabulary():
    config = get_preset("tiny")
    model = GPT(config, init_params(config))
    idx = np.zeros((2, 4), dtype=np.int64)
    idx[1, 2] = 256
    with pytest.raises(ValueError, match=r"token id 256 at position \(1, 2\).*0\.\.255"):
        model.forward(idx)
    with pytest.raises(ValueError, match="token id -1"):
        model.forward(np.full((1, 3), -1))


def test_forward_rejects_sequences_longer_than_block_size():
    config = get_preset("tiny")
    model = GPT(config, init_params(config))
    with pytest.raises(ValueError, match="65 positions, more than block_size=64"):
        model.forward(np.zeros((1, 65), dtype=np.int64))


def test_forward_rejects_float_ids_and_mismatched_targets():
    config = get_preset("tiny")
    model = GPT(config, init_params(config))
    with pytest.raises(TypeError, match="integer"):
        model.forward(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="targets have shape"):
        model.forward(np.zeros((1, 4), dtype=np.int64), np.zeros((1, 3), dtype=np.int64))


def test_model_rejects_missing_or_misshaped_parameters():
    config = get_preset("tiny")
    params = init_params(config)
    del params["transformer.ln_f.bias"]
    with pytest.raises(KeyError, match="transformer.ln_f.bias"):
        GPT(config, params)
    params = init_params(config)
    params["transformer.h.0.attn.c_attn.weight"] = params["transformer.h.0.attn.c_attn.weight"].T
    with pytest.raises(ValueError, match=r"c_attn.weight.*\(192, 64\), expected \(64, 192\)"):
        GPT(config, params)


@pytest.mark.parametrize(
    "field, value, message",
    [("n_head", 3, "not divisible"), ("n_layer", 0, "positive integer"), ("dropout", 1.0, r"\[0, 1\)")],
)
def test_config_rejects_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny", **{field: value})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="gpt2s.*medium.*small.*tiny"):
        get_preset("huge")


def test_backward_refuses_a_cache_made_by_other_layer_functions():
    config = get_preset("tiny")
    model = perturbed_model(config)
    idx, targets = random_batch(config, T=8)
    _, _, cache = model.forward(idx, targets)
    model.ops = replace(REFERENCE_OPS, name="other")
    with pytest.raises(ValueError, match="made by the 'reference' layer functions"):
        model.backward(cache)
