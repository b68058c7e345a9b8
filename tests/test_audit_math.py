"""Findings of the correctness audit, each pinned by a test that fails on the broken code: a float16
base, disabling a merged adapter, merge_and_unload's copies, DoRA's dropout (PEFT's definition) and
its zero columns, LoRA+ weight decay, and the gradient checker on small gradients."""

import numpy as np
import pytest

from minilora.config import GPTConfig
from minilora.gradcheck import check_gradients, check_layer, relative_error
from minilora.lora.config import LoraConfig
from minilora.lora.dora import dora_linear_backward, dora_linear_forward
from minilora.lora.model import add_lora
from minilora.lora.variants import MAGNITUDE, DoraVariant
from minilora.model import GPT, init_params
from minilora.optim import AdamW

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)


def base_model(dtype=np.float64, seed=0) -> GPT:
    params = init_params(CONFIG, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for value in params.values():
        value += 0.2 * rng.standard_normal(value.shape)  # biases != 0, so a trained bias shows
    return GPT(CONFIG, {name: value.astype(dtype) for name, value in params.items()})


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CONFIG.vocab_size, (2, 8)), rng.integers(0, CONFIG.vocab_size, (2, 8))


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# A float16 base: float32 adapters and optimiser state, no NaN.


@pytest.mark.parametrize(
    "lora_config",
    [
        LoraConfig(r=2, target_modules="all-linear"),
        LoraConfig(r=2, target_modules=("c_attn", "mlp.c_fc"), use_dora=True, lora_dropout=0.1),
        LoraConfig(r=2, init="pissa"),
        LoraConfig(r=2, bias="lora_only"),
    ],
    ids=["lora", "dora", "pissa", "bias"],
)
def test_a_float16_base_trains_float32_adapters_without_nan(lora_config):
    model = add_lora(base_model(np.float16), lora_config)
    assert {model.params[name].dtype for name in model.trainable_names} == {np.dtype(np.float32)}
    assert model.params["transformer.h.0.attn.c_attn.weight"].dtype == np.float16  # the base stays
    optimizer = AdamW(model.params, model.trainable_names, lr=1e-3)
    start = {name: model.params[name].copy() for name in model.trainable_names}
    idx, targets = batch()
    for step in range(2):
        logits, _, cache = model.forward(idx, targets, dropout_rng=np.random.default_rng(step))
        assert logits.dtype == np.float16 or lora_config.bias != "none"
        grads = model.backward(cache)
        assert {grad.dtype for grad in grads.values()} == {np.dtype(np.float32)}
        optimizer.step(grads)
    assert {buffer.dtype for kind in optimizer.state.values() for buffer in kind.values()} == {
        np.dtype(np.float32)
    }
    assert all(np.isfinite(model.params[name]).all() for name in model.trainable_names)
    assert all(not np.array_equal(model.params[name], start[name]) for name in model.trainable_names)


def test_an_adapter_loaded_onto_a_float16_base_stays_float32(tmp_path):
    from minilora.io.adapters import load_adapter, save_adapter

    model = add_lora(base_model(np.float16), LoraConfig(r=2, init="random", bias="lora_only"))
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(base_model(np.float16), tmp_path / "adapter")
    for name in model.trainable_names:
        assert loaded.params[name].dtype == np.float32, name
        np.testing.assert_array_equal(loaded.params[name], model.params[name])


def test_a_float16_base_with_float32_adapters_computes_what_float32_does():
    lora_config = LoraConfig(r=2, target_modules="all-linear", init="random")
    half, full = add_lora(base_model(np.float16), lora_config), add_lora(base_model(np.float32), lora_config)
    idx, targets = batch()
    _, loss_half, cache = half.forward(idx, targets)
    _, loss_full, cache_full = full.forward(idx, targets)
    assert abs(float(loss_half) - float(loss_full)) < 1e-2
    grads_half, grads_full = half.backward(cache), full.backward(cache_full)
    for name, grad in grads_full.items():
        assert relative(grads_half[name], grad) < 0.05, name


# disable_adapter() runs the base, merged or not, trained biases or not.


@pytest.mark.parametrize(
    "lora_config",
    [
        LoraConfig(r=2, target_modules="all-linear", init="random"),
        LoraConfig(r=2, target_modules="all-linear", init="random", bias="all"),
        LoraConfig(r=2, init="pissa"),
    ],
    ids=["lora", "trained-biases", "pissa"],
)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_disable_adapter_gives_the_base_logits_merged_or_not(lora_config, merged):
    idx, _ = batch()
    base_logits = base_model().forward(idx)[0]
    model = add_lora(base_model(), lora_config)
    for name in model.trainable_names:
        model.params[name] += 0.1  # a trained adapter, biases moved too
    adapted = model.forward(idx)[0]
    assert relative(adapted, base_logits) > 1e-2
    if merged:
        model.merge()
    with model.disable_adapter():
        np.testing.assert_allclose(model.forward(idx)[0], base_logits, rtol=0, atol=1e-12)
    assert model.merged == merged
    np.testing.assert_allclose(model.forward(idx)[0], adapted, rtol=0, atol=1e-12)  # the adapter is back


def test_merge_and_unload_of_a_merged_model_is_not_changed_by_a_later_unmerge():
    model = add_lora(base_model(), LoraConfig(r=2, target_modules="all-linear", init="random", bias="all"))
    idx, _ = batch()
    model.merge()
    plain = model.merge_and_unload()
    expected = plain.forward(idx)[0].copy()
    model.unmerge()
    for name in model.trainable_names:
        model.params[name] += 1.0  # and trained further
    np.testing.assert_array_equal(plain.forward(idx)[0], expected)


# DoRA: PEFT's dropout, zero columns.


def dora_inputs(rng, C_in=6, C_out=5, r=3):
    return {
        "x": rng.standard_normal((2, 4, C_in)),
        "W": rng.standard_normal((C_in, C_out)),
        "b": rng.standard_normal(C_out),
        "lora_A": rng.standard_normal((r, C_in)),
        "lora_B": rng.standard_normal((C_out, r)),
        "magnitude": 1.0 + rng.random(C_out),
    }


def test_dora_with_dropout_matches_peft_in_output_and_every_gradient():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(3)
    inputs = dora_inputs(rng)
    mask = (rng.random((2, 4, 6)) > 0.5) / 0.5
    scaling = 4.0 / 3

    class FixedDropout(torch.nn.Module):  # PEFT's dropout with our mask, so both drop the same inputs
        def forward(self, x):
            return x * torch.from_numpy(mask)

    linear = torch.nn.Linear(6, 5, dtype=torch.float64)
    peft_config = peft.LoraConfig(r=3, lora_alpha=4, target_modules=["0"], use_dora=True, lora_dropout=0.5)
    layer = peft.get_peft_model(torch.nn.Sequential(linear), peft_config).base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(inputs["W"].T))  # torch's (C_out, C_in)
        layer.base_layer.bias.copy_(torch.from_numpy(inputs["b"]))
    layer.base_layer.bias.requires_grad_(True)  # PEFT freezes it; its gradient is compared too
    tensors = {
        "lora_A": layer.lora_A["default"].weight,
        "lora_B": layer.lora_B["default"].weight,
        "magnitude": layer.lora_magnitude_vector["default"].weight,
    }
    for name, parameter in tensors.items():
        parameter.data = torch.from_numpy(inputs[name].copy())
    layer.lora_dropout["default"] = FixedDropout()
    layer.train()
    x = torch.from_numpy(inputs["x"].copy()).requires_grad_(True)
    y_peft = layer(x)
    dout = rng.standard_normal(y_peft.shape)
    (y_peft * torch.from_numpy(dout)).sum().backward()

    args = [inputs[k] for k in ("x", "W", "b", "lora_A", "lora_B", "magnitude")]
    y, cache = dora_linear_forward(*args, scaling, dropout_mask=mask)
    dx, db, dlora_A, dlora_B, dm = dora_linear_backward(dout, cache)
    np.testing.assert_allclose(y, y_peft.detach().numpy(), rtol=0, atol=1e-13)
    for ours, theirs in [(dx, x.grad), (db, layer.base_layer.bias.grad), (dlora_A, tensors["lora_A"].grad),
                         (dlora_B, tensors["lora_B"].grad), (dm, tensors["magnitude"].grad)]:  # fmt: skip
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-12)
    without = dora_linear_forward(*args, scaling)[0]
    assert relative(y, without) > 0.1  # the mask matters: a forward that ignored it would fail above


def test_dora_with_dropout_passes_the_gradient_check_for_both_backwards():
    rng = np.random.default_rng(4)
    mask = (rng.random((2, 4, 6)) > 0.3) / 0.7
    for exact in (False, True):
        inputs = dora_inputs(rng)
        held = None if exact else dora_linear_forward(**inputs, scaling=2.0)[1].weight_norm

        def forward(x, W, b, lora_A, lora_B, magnitude, exact=exact, held=held):
            return dora_linear_forward(
                x, W, b, lora_A, lora_B, magnitude, 2.0, mask, weight_norm=held, exact_norm_gradient=exact
            )

        result = check_layer(
            forward, dora_linear_backward, inputs, ("x", "b", "lora_A", "lora_B", "magnitude")
        )
        result.assert_ok(1e-7)


def test_dora_on_an_all_zero_output_column_stays_finite_and_zero():
    rng = np.random.default_rng(5)
    inputs = dora_inputs(rng)
    inputs["W"][:, 2] = 0.0  # a dead output unit
    inputs["lora_B"][2] = 0.0  # that the adapter does not reach either
    tensors = {"lora_A": inputs["lora_A"], "lora_B": inputs["lora_B"]}
    variant = DoraVariant()
    from minilora.lora.init import init_dora_magnitudes

    tensors[MAGNITUDE] = init_dora_magnitudes(
        {"m": inputs["W"]}, {f"m.{k}": v for k, v in tensors.items()}, 2.0
    )[f"m.{MAGNITUDE}"]
    y, cache, _ = variant.forward(inputs["x"], inputs["W"], None, tensors, 2.0)
    dx, grads = variant.backward(rng.standard_normal(y.shape), cache)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert all(np.isfinite(g).all() for g in grads.values())
    np.testing.assert_array_equal(y[..., 2], 0.0)
    merged, undo = variant.merge(inputs["W"], tensors, 2.0)
    assert np.isfinite(merged).all()
    np.testing.assert_allclose(inputs["x"] @ merged, y, rtol=0, atol=1e-12)


# LoRA+ weight decay: each group's own learning rate.


def test_loraplus_weight_decay_uses_each_groups_learning_rate_as_torch_does():
    torch = pytest.importorskip("torch")
    from minilora.jobs.finetune import make_optimizer
    from minilora.training.loop import TrainSettings

    model = add_lora(base_model(), LoraConfig(r=2, target_modules="all-linear", init="random"))
    optimizer = make_optimizer(model, TrainSettings(lr=1e-2, weight_decay=0.5), loraplus_ratio=16.0)
    names = model.trainable_names
    assert optimizer.decay_names == set(names)  # every factor is a matrix: decayed
    tensors = {name: torch.tensor(model.params[name], requires_grad=True) for name in names}
    groups = [
        {"params": [tensors[n] for n in names if not n.endswith("lora_B")], "lr": 1e-2},
        {"params": [tensors[n] for n in names if n.endswith("lora_B")], "lr": 16e-2},
    ]
    betas = (optimizer.beta1, optimizer.beta2)
    reference = torch.optim.AdamW(groups, betas=betas, eps=optimizer.eps, weight_decay=0.5)
    rng = np.random.default_rng(6)
    for _ in range(3):
        grads = {
            name: 1e-3 * rng.standard_normal(model.params[name].shape) for name in names
        }  # decay dominates
        optimizer.step(grads)
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(grads[name])
        reference.step()
    for name, tensor in tensors.items():
        np.testing.assert_allclose(model.params[name], tensor.detach().numpy(), rtol=1e-12, atol=1e-15)


# The gradient checker on small gradients, far above its error floor.


@pytest.mark.parametrize("size", [1e-6, 1e-9])
def test_the_gradient_checker_measures_small_gradients_relative_to_their_size(size):
    a = size * np.array([1.0, -2.0, 3.0])
    assert relative_error(a, a * (1 + 0.01)) == pytest.approx(0.01 / 1.01, rel=1e-9)  # not shrunk by a floor
    params = {"w": np.array([0.3, -1.2, 2.0])}

    def loss():
        return size * np.sum(np.sin(params["w"]))

    right = {"w": size * np.cos(params["w"])}
    check_gradients(loss, params, right).assert_ok(1e-6)
    wrong = {"w": right["w"] * np.array([1.0, 1.0, 1.02])}  # 2% off in one entry
    result = check_gradients(loss, params, wrong)
    assert result.max_error == pytest.approx(0.02 * abs(right["w"][2]) / np.abs(wrong["w"]).max(), rel=1e-3)
    with pytest.raises(AssertionError, match="'w'"):
        result.assert_ok(1e-6)
