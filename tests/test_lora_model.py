"""LoRA injection, configuration errors, real freezing (counted matmuls), and merging."""

import numpy as np
import pytest

from minilora.backend import count_matmuls
from minilora.config import GPTConfig, get_preset
from minilora.lora.config import LoraConfig, select_target_modules
from minilora.lora.init import init_lora_factors
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.optim import AdamW

SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8)


def base_model(config=SMALL, dtype=np.float64, seed=0):
    params = init_params(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for value in params.values():
        value += (0.05 * rng.standard_normal(value.shape)).astype(dtype)
    return GPT(config, params)


def batch(config=SMALL, B=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (B, config.block_size)), rng.integers(
        0, config.vocab_size, (B, config.block_size)
    )


@pytest.mark.parametrize(
    "targets, expected",
    [
        (("c_attn",), {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}),
        (("c_proj",), {f"transformer.h.{i}.{m}.c_proj" for i in range(2) for m in ("attn", "mlp")}),
        (("attn.c_proj",), {"transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"}),
        (
            "all-linear",
            {
                f"transformer.h.{i}.{m}"
                for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
            },
        ),
        (r"transformer\.h\.1\.mlp\..*", {"transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"}),
    ],
)
def test_target_modules_follow_peft_matching_rules(targets, expected):
    assert set(select_target_modules(LoraConfig(target_modules=targets), SMALL)) == expected


def test_layers_to_transform_keeps_only_those_blocks():
    chosen = select_target_modules(LoraConfig(target_modules="all-linear", layers_to_transform=1), SMALL)
    assert chosen and all(name.startswith("transformer.h.1.") for name in chosen)


def test_targets_that_match_nothing_list_the_adaptable_modules():
    with pytest.raises(
        ValueError,
        match=r"match no module.*blocks 0-1 x \{attn\.c_attn, attn\.c_proj, mlp\.c_fc, mlp\.c_proj\}",
    ):
        select_target_modules(LoraConfig(target_modules=("q_proj",)), SMALL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "positive integer"),
        ({"r": -2}, "positive integer"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, r"\[0, 1\)"),
        ({"lora_dropout": -0.1}, r"\[0, 1\)"),
        ({"init": "zeros"}, "init"),
        ({"bias": "some"}, "bias"),
        ({"target_modules": ()}, "empty"),
    ],
)
def test_invalid_lora_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_rank_above_the_smaller_side_of_a_weight_is_refused():
    with pytest.raises(
        ValueError, match=r"r=17 is larger than min\(C_in, C_out\) = 16 of transformer.h.0.attn.c_attn"
    ):
        select_target_modules(LoraConfig(r=17), SMALL)
    select_target_modules(LoraConfig(r=16), SMALL)  # r == min side is allowed


def test_layers_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"layers_to_transform \[5\] out of range.*0\.\.1"):
        select_target_modules(LoraConfig(layers_to_transform=[0, 5]), SMALL)


def test_default_init_draws_A_with_peft_bound_and_zeros_B():
    tensors = init_lora_factors(LoraConfig(r=64), {"m": (384, 1152)}, seed=0)
    A, B = tensors["m.lora_A"], tensors["m.lora_B"]
    assert A.shape == (64, 384) and B.shape == (1152, 64) and A.dtype == np.float32
    bound = 1 / np.sqrt(384)
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.99 * bound
    assert np.std(A) == pytest.approx(bound / np.sqrt(3), rel=0.02)  # uniform(-a, a) has std a / sqrt(3)
    assert np.all(B == 0)


def test_gaussian_init_has_std_one_over_r_and_random_init_has_nonzero_B():
    A = init_lora_factors(LoraConfig(r=16, init="gaussian"), {"m": (512, 512)})["m.lora_A"]
    assert np.std(A) == pytest.approx(1 / 16, rel=0.02)
    random_B = init_lora_factors(LoraConfig(r=4, init="random"), {"m": (8, 8)})["m.lora_B"]
    assert np.count_nonzero(random_B) == 32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_added_adapter_draws_its_factors_like_init_lora_factors_on_the_host(dtype):
    lora_config = LoraConfig(r=3, init="random", target_modules="all-linear", use_dora=True, bias="lora_only")
    lora = add_lora(base_model(dtype=dtype), lora_config, seed=11)
    expected = init_lora_factors(lora_config, select_target_modules(lora_config, SMALL), seed=11, dtype=dtype)
    for name, value in expected.items():
        assert lora.params[name].dtype == dtype
        np.testing.assert_array_equal(lora.params[name], value)
    magnitudes = [name for name in lora.trainable_names if name.endswith(".lora_magnitude_vector")]
    biases = [name for name in lora.trainable_names if name.endswith(".bias")]
    assert lora.trainable_names == [*expected, *magnitudes, *biases]  # factors, magnitudes, biases
    assert len(magnitudes) == len(biases) == 4 * SMALL.n_layer


def test_a_fresh_adapter_starts_exactly_at_the_base_model():
    base = base_model()
    idx, _ = batch()
    lora = add_lora(base, LoraConfig(r=4, target_modules="all-linear"))
    np.testing.assert_array_equal(lora.forward(idx)[0], base.forward(idx)[0])


def test_only_the_adapter_is_trainable_and_the_optimiser_keeps_state_for_it_alone():
    lora = add_lora(base_model(dtype=np.float32), LoraConfig(r=4, target_modules=("c_attn", "attn.c_proj")))
    assert set(lora.trainable_names) == {
        f"transformer.h.{i}.attn.{m}.lora_{f}" for i in range(2) for m in ("c_attn", "c_proj") for f in "AB"
    }
    optimizer = AdamW(lora.params, lora.trainable_names, lr=1e-2)
    idx, targets = batch()
    grads = lora.backward(lora.forward(idx, targets)[2])
    assert set(grads) == set(lora.trainable_names)
    optimizer.step(grads)
    for buffers in optimizer.state.values():
        assert set(buffers) == set(lora.trainable_names)


def test_no_frozen_weight_gets_a_weight_gradient_product():
    config = get_preset("tiny")
    C = config.n_embd
    weight_shapes = [
        (C, 3 * C),
        (C, C),
        (C, 4 * C),
        (4 * C, C),
        (C, config.vocab_size),
        (config.vocab_size, C),
    ]
    base = GPT(config, init_params(config))
    idx, targets = batch(config, B=2)
    with count_matmuls() as full_step:
        base.backward(base.forward(idx, targets)[2])
    lora = add_lora(base, LoraConfig(r=8, target_modules=("c_attn", "attn.c_proj"), init="random"))
    with count_matmuls() as lora_step:
        lora.backward(lora.forward(idx, targets)[2])
    assert all(
        full_step.outputs_of_shape(shape) > 0 for shape in weight_shapes[:5]
    )  # full: every dW is formed
    assert all(lora_step.outputs_of_shape(shape) == 0 for shape in weight_shapes)  # LoRA: none of them
    assert lora_step.outputs_of_shape((8, C)) == 2 * config.n_layer  # dA of c_attn and attn.c_proj
    assert lora_step.flops < full_step.flops


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_merged_forward_equals_unmerged_and_unmerge_restores_the_base(dtype, tol):
    base = base_model(dtype=dtype)
    original = {name: value.copy() for name, value in base.params.items()}
    lora = add_lora(base, LoraConfig(r=4, target_modules="all-linear", init="random"), seed=1)
    idx, _ = batch()
    unmerged = lora.forward(idx)[0]
    lora.merge()
    merged = lora.forward(idx)[0]
    assert np.max(np.abs(merged - unmerged)) / np.max(np.abs(unmerged)) < tol
    assert not np.array_equal(
        lora.params["transformer.h.0.mlp.c_fc.weight"], original["transformer.h.0.mlp.c_fc.weight"]
    )
    lora.unmerge()
    for name, value in original.items():
        np.testing.assert_allclose(base.params[name], value, rtol=0, atol=20 * np.finfo(dtype).eps)
    np.testing.assert_allclose(lora.forward(idx)[0], unmerged, rtol=0, atol=tol * np.max(np.abs(unmerged)))


def test_merging_twice_or_unmerging_an_unmerged_adapter_is_an_error():
    lora = add_lora(base_model(), LoraConfig(r=2, init="random"))
    with pytest.raises(RuntimeError, match="not merged"):
        lora.unmerge()
    lora.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        lora.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        idx, targets = batch()
        lora.backward(lora.forward(idx, targets)[2])


def test_merge_refuses_to_write_non_finite_weights_and_changes_nothing():
    lora = add_lora(base_model(), LoraConfig(r=2, target_modules="all-linear", init="random"))
    before = {name: value.copy() for name, value in lora.params.items()}
    lora.params["transformer.h.1.mlp.c_proj.lora_B"][0, 0] = np.inf
    with pytest.raises(FloatingPointError, match="nothing was changed"):
        lora.merge()
    assert not lora.merged
    for name in lora.base_keys:
        np.testing.assert_array_equal(lora.params[name], before[name])


def test_merge_and_unload_gives_a_plain_model_with_the_base_parameter_count():
    base = base_model()
    lora = add_lora(base, LoraConfig(r=4, target_modules="all-linear", init="random"))
    idx, _ = batch()
    merged = lora.merge_and_unload()
    assert type(merged) is GPT
    assert merged.num_parameters() == base.num_parameters() < lora.num_parameters()
    np.testing.assert_allclose(merged.forward(idx)[0], lora.forward(idx)[0], rtol=1e-10, atol=1e-12)
    assert not lora.merged  # the LoRA model is untouched


def test_training_biases_never_changes_the_base_model():
    base = base_model()
    bias_before = base.params["transformer.h.0.attn.c_attn.bias"].copy()
    lora = add_lora(base, LoraConfig(r=2, bias="lora_only"))
    assert "transformer.h.0.attn.c_attn.bias" in lora.trainable_names
    lora.params["transformer.h.0.attn.c_attn.bias"] += 1.0
    np.testing.assert_array_equal(base.params["transformer.h.0.attn.c_attn.bias"], bias_before)


def test_adding_lora_twice_is_refused():
    lora = add_lora(base_model(), LoraConfig(r=2))
    with pytest.raises(TypeError, match="already has adapters.*add_adapter"):
        add_lora(lora, LoraConfig(r=2))


def test_adapter_layers_run_through_the_models_lora_ops_and_a_cache_returns_to_the_ops_that_made_it():
    from dataclasses import replace

    from minilora.lora.ops import REFERENCE_LORA_OPS

    calls = []

    def spy(name):
        function = getattr(REFERENCE_LORA_OPS, name)

        def wrapped(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)

        return wrapped

    names = ("lora_linear_forward", "lora_linear_backward")
    spying = replace(REFERENCE_LORA_OPS, name="spy", **{name: spy(name) for name in names})
    model = add_lora(base_model(), LoraConfig(r=2, target_modules=["c_attn"], init="random"))
    assert model.lora_ops is REFERENCE_LORA_OPS
    x, y = batch()
    want = model.backward(model.forward(x, y)[2])
    model.lora_ops = spying
    cache = model.forward(x, y)[2]
    model.lora_ops = REFERENCE_LORA_OPS  # swapped between the forward and the backward
    got = model.backward(cache)
    assert calls == ["lora_linear_forward"] * SMALL.n_layer + ["lora_linear_backward"] * SMALL.n_layer
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
