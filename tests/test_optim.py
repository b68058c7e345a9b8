"""Optimisers, clipping and the LR schedule: against torch.optim where installed, by hand elsewhere.

The torch comparisons feed both sides the same float64 gradients step after step and compare the
parameters (and Adam's moments) after every step. The other tests pin down behaviour that torch
cannot: which names get state and weight decay, the schedule's values, checkpoint round trips, and
the errors for mismatched gradients.
"""

import copy
import io
import math
import re

import numpy as np
import pytest

from minilora.config import GPTConfig
from minilora.model import GPT, WPE, WTE, init_params
from minilora.optim import SGD, AdamW, clip_grad_norm, cosine_lr, default_decay_names

CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
TORCH_RTOL = 1e-12  # same arithmetic in float64; only the rounding order may differ
TORCH_ATOL = 1e-15


def float64_params(seed=0) -> dict:
    params = init_params(CONFIG, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for value in params.values():
        value += 0.1 * rng.standard_normal(value.shape)  # gains != 1, biases != 0: decay would show
    return params


def random_grads(params: dict, names, rng) -> dict:
    return {name: rng.standard_normal(params[name].shape) for name in names}


def torch_param_groups(torch, params: dict, names, decay_names, weight_decay):
    """torch tensors for ``names`` in two groups: decayed (weight_decay) and the rest (0)."""
    tensors = {name: torch.tensor(params[name], requires_grad=True) for name in names}
    groups = [
        {"params": [tensors[n] for n in names if n in decay_names], "weight_decay": weight_decay},
        {"params": [tensors[n] for n in names if n not in decay_names], "weight_decay": 0.0},
    ]
    assert groups[0]["params"] and groups[1]["params"], "both groups must be non-empty to test anything"
    return tensors, groups


def assert_close_to_torch(ours: dict, tensors: dict, what: str) -> None:
    for name, tensor in tensors.items():
        np.testing.assert_allclose(
            ours[name], tensor.detach().numpy(), rtol=TORCH_RTOL, atol=TORCH_ATOL, err_msg=f"{what}: {name}"
        )


def test_adamw_matches_torch_with_decay_only_on_default_names_and_per_step_lr():
    torch = pytest.importorskip("torch")
    params = float64_params()
    names = list(params)
    decay = default_decay_names(params, names)
    initial = {name: value.copy() for name, value in params.items()}
    opt = AdamW(params, names, lr=1e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    tensors, groups = torch_param_groups(torch, initial, names, decay, weight_decay=0.1)
    ref = torch.optim.AdamW(groups, lr=1e-3, betas=(0.8, 0.95), eps=1e-6)
    rng = np.random.default_rng(2)
    lrs = [3e-2, 1e-2, 5e-2, 2e-3, 1e-2, 7e-3]
    for step, lr in enumerate(lrs):
        grads = random_grads(params, names, rng)
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(grads[name])
        for group in ref.param_groups:
            group["lr"] = lr
        ref.step()
        opt.step(grads, lr=lr)
        assert_close_to_torch(params, tensors, f"params after step {step + 1}")
    for kind in ("exp_avg", "exp_avg_sq"):
        assert_close_to_torch(opt.state[kind], {n: ref.state[t][kind] for n, t in tensors.items()}, kind)
    assert opt.step_count == len(lrs)
    # decay really acted: an undecayed run ends elsewhere for the decayed names only
    undecayed = {name: value.copy() for name, value in initial.items()}
    opt0, rng = (
        AdamW(undecayed, names, lr=1e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0),
        np.random.default_rng(2),
    )
    for lr in lrs:
        opt0.step(random_grads(undecayed, names, rng), lr=lr)
    assert all(not np.allclose(undecayed[n], params[n], rtol=0, atol=1e-9) for n in decay)
    assert all(np.array_equal(undecayed[n], params[n]) for n in names if n not in decay)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_with_momentum_and_weight_decay_matches_torch(nesterov):
    torch = pytest.importorskip("torch")
    params = float64_params()
    names = list(params)
    decay = default_decay_names(params, names)
    initial = {name: value.copy() for name, value in params.items()}
    opt = SGD(params, names, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    tensors, groups = torch_param_groups(torch, initial, names, decay, weight_decay=0.01)
    ref = torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=nesterov)
    rng = np.random.default_rng(3)
    for step, lr in enumerate([0.05, 0.1, 0.02, 0.05, 0.08]):
        grads = random_grads(params, names, rng)
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(grads[name])
        for group in ref.param_groups:
            group["lr"] = lr
        ref.step()
        opt.step(grads, lr=lr)
        assert_close_to_torch(params, tensors, f"params after step {step + 1}")
    assert_close_to_torch(
        opt.state["momentum_buffer"],
        {n: ref.state[t]["momentum_buffer"] for n, t in tensors.items()},
        "momentum_buffer",
    )


@pytest.mark.parametrize("max_norm", [1e3, 2.0], ids=["below_max_norm", "above_max_norm"])
def test_clip_grad_norm_matches_torch_norm_and_clipped_gradients(max_norm):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    grads = {
        "a": rng.standard_normal((5, 7)),
        "b": rng.standard_normal(7),
        "c": 3.0 * rng.standard_normal((2, 3, 4)),
    }
    original = {name: g.copy() for name, g in grads.items()}
    tensors = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads.values()]
    for tensor, g in zip(tensors, grads.values()):
        tensor.grad = torch.tensor(g)
    ref_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    norm = clip_grad_norm(grads, max_norm)
    assert np.ndim(norm) == 0
    assert float(norm) == pytest.approx(float(ref_norm), rel=1e-14)
    for (name, g), tensor in zip(grads.items(), tensors):
        np.testing.assert_allclose(g, tensor.grad.numpy(), rtol=1e-14, atol=0, err_msg=name)
    total = math.sqrt(sum(float(np.sum(g * g)) for g in original.values()))
    assert float(norm) == pytest.approx(total, rel=1e-14)
    if total <= max_norm:
        assert all(np.array_equal(grads[n], original[n]) for n in grads)  # untouched
    else:
        clipped = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
        assert clipped == pytest.approx(max_norm, rel=1e-6) and clipped <= max_norm


def test_optimiser_state_exists_only_for_trainable_parameters():
    params = float64_params()
    frozen = [name for name in params if not name.startswith("transformer.h.0.attn.")]
    model = GPT(CONFIG, params, frozen=frozen)
    rng = np.random.default_rng(5)
    idx, targets = rng.integers(0, CONFIG.vocab_size, (2, 6)), rng.integers(0, CONFIG.vocab_size, (2, 6))
    grads = model.backward(model.forward(idx, targets)[2])
    trainable = set(model.trainable_names)
    assert trainable == set(grads) and 0 < len(trainable) < len(params)
    for opt in (
        AdamW(params, model.trainable_names, lr=1e-3),
        SGD(params, model.trainable_names, momentum=0.9),
    ):
        opt.step(grads)
        assert set(opt.state) == set(opt.state_names) and opt.state
        for kind, buffers in opt.state.items():
            assert set(buffers) == trainable, kind
        assert {key.split(".", 1)[1] for key in opt.state_dict()["buffers"]} == trainable


def test_optimiser_leaves_frozen_parameters_untouched():
    params = float64_params()
    before = {name: value.copy() for name, value in params.items()}
    trainable = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias"]
    opt = AdamW(params, trainable, lr=1e-2, weight_decay=0.1)
    opt.step(random_grads(params, trainable, np.random.default_rng(6)))
    for name in params:
        assert np.array_equal(params[name], before[name]) == (name not in trainable), name


def test_default_decay_names_are_the_linear_matrices_only():
    params = init_params(CONFIG, dtype=np.float64)
    decay = default_decay_names(params, list(params), GPT.no_decay)
    expected = {
        f"transformer.h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert decay == expected
    assert not any(name.endswith(".bias") for name in decay)
    assert not any(".ln_" in name for name in decay)
    assert WTE not in decay and WPE not in decay
    # only among the names asked about
    assert default_decay_names(params, ["transformer.h.0.mlp.c_fc.weight", WTE], GPT.no_decay) == {
        "transformer.h.0.mlp.c_fc.weight"
    }
    assert WTE in default_decay_names(params, [WTE])  # a matrix a model does not name is decayed


def test_cosine_lr_warms_up_linearly_then_decays_to_min_lr():
    max_lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 110
    assert cosine_lr(0, max_lr, total, warmup, min_lr) == pytest.approx(max_lr / warmup)
    assert cosine_lr(4, max_lr, total, warmup, min_lr) == pytest.approx(5e-4)
    assert cosine_lr(warmup - 1, max_lr, total, warmup, min_lr) == pytest.approx(max_lr)
    assert cosine_lr(warmup, max_lr, total, warmup, min_lr) == pytest.approx(max_lr)  # decay starts at max
    midpoint = warmup + (total - warmup) // 2  # progress 1/2: cos(pi/2) = 0
    assert cosine_lr(midpoint, max_lr, total, warmup, min_lr) == pytest.approx((1e-3 + 1e-4) / 2)
    quarter = warmup + (total - warmup) // 4  # cos(pi/4) = sqrt(2)/2
    assert cosine_lr(quarter, max_lr, total, warmup, min_lr) == pytest.approx(
        1e-4 + 9e-4 * (1 + 0.5**0.5) / 2
    )
    assert cosine_lr(total, max_lr, total, warmup, min_lr) == min_lr
    assert cosine_lr(total + 50, max_lr, total, warmup, min_lr) == min_lr
    schedule = [cosine_lr(s, max_lr, total, warmup, min_lr) for s in range(total + 5)]
    assert all(a < b for a, b in zip(schedule[: warmup - 1], schedule[1:warmup]))  # rising warmup
    assert all(a >= b for a, b in zip(schedule[warmup:], schedule[warmup + 1 :]))  # then never rising
    assert min(schedule) == min_lr


def test_cosine_lr_without_warmup_starts_at_max_lr():
    assert cosine_lr(0, 0.5, 100) == 0.5
    assert cosine_lr(50, 0.5, 100) == pytest.approx(0.25)
    assert cosine_lr(100, 0.5, 100) == 0.0


def checkpoint_round_trip(state: dict) -> dict:
    """What a checkpoint on disk gives back: fresh arrays, nothing shared with the live optimiser."""
    buffer = io.BytesIO()
    np.savez(buffer, **state["buffers"])
    buffer.seek(0)
    with np.load(buffer) as saved:
        return {"step_count": int(state["step_count"]), "buffers": {key: saved[key] for key in saved.files}}


@pytest.mark.parametrize(
    "make",
    [
        lambda p, n: AdamW(p, n, lr=1e-2, weight_decay=0.1),
        lambda p, n: SGD(p, n, lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True),
    ],
    ids=["adamw", "sgd"],
)
def test_state_dict_round_trip_resumes_training_bitwise(make):
    names = [name for name in float64_params() if name != WPE]
    rng = np.random.default_rng(7)
    all_grads = [random_grads(float64_params(), names, rng) for _ in range(6)]
    lrs = [cosine_lr(s, 1e-2, 6, warmup_steps=2) for s in range(6)]

    straight = float64_params()
    opt = make(straight, names)
    for grads, lr in zip(all_grads, lrs):
        opt.step({k: g.copy() for k, g in grads.items()}, lr=lr)

    first = float64_params()
    opt_a = make(first, names)
    for grads, lr in zip(all_grads[:3], lrs[:3]):
        opt_a.step({k: g.copy() for k, g in grads.items()}, lr=lr)
    saved_params = copy.deepcopy(first)
    saved_state = checkpoint_round_trip(opt_a.state_dict())
    for grads in all_grads[
        3:
    ]:  # the first optimiser carries on with other gradients: no effect on the saved copy
        opt_a.step({k: -g for k, g in grads.items()})

    resumed = saved_params
    opt_b = make(resumed, names)
    opt_b.load_state_dict(saved_state)
    assert opt_b.step_count == 3
    for grads, lr in zip(all_grads[3:], lrs[3:]):
        opt_b.step({k: g.copy() for k, g in grads.items()}, lr=lr)
    for name in straight:
        assert np.array_equal(resumed[name], straight[name]), name
    for kind in opt.state:
        for name in names:
            assert np.array_equal(opt_b.state[kind][name], opt.state[kind][name]), f"{kind}.{name}"


def test_load_state_dict_rejects_state_for_an_untrained_name():
    params = float64_params()
    opt = AdamW(params, [WTE], lr=1e-3)
    opt.step({WTE: np.ones_like(params[WTE])})
    other = AdamW(params, [WPE], lr=1e-3)
    with pytest.raises(KeyError, match=re.escape(f"exp_avg.{WTE}")):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "make", [lambda p, n: AdamW(p, n, lr=1e-3), lambda p, n: SGD(p, n, momentum=0.9)], ids=["adamw", "sgd"]
)
def test_step_with_a_missing_or_extra_gradient_raises_key_error_naming_it(make):
    params = float64_params()
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"]
    before = {name: value.copy() for name, value in params.items()}
    opt = make(params, names)
    grads = random_grads(params, names, np.random.default_rng(8))
    missing = {names[0]: grads[names[0]]}
    with pytest.raises(KeyError, match=re.escape(f"missing ['{names[1]}']")):
        opt.step(missing)
    extra = {**grads, "transformer.ln_f.bias": np.zeros_like(params["transformer.ln_f.bias"])}
    with pytest.raises(KeyError, match=re.escape("unexpected ['transformer.ln_f.bias']")):
        opt.step(extra)
    # a refused step changes nothing
    assert opt.step_count == 0 and all(not buffers for buffers in opt.state.values())
    assert all(np.array_equal(params[name], before[name]) for name in params)


def test_optimiser_rejects_unknown_names_and_bad_hyperparameters():
    params = float64_params()
    with pytest.raises(KeyError, match="transformer.h.9.attn.c_attn.weight"):
        AdamW(params, ["transformer.h.9.attn.c_attn.weight"])
    with pytest.raises(ValueError, match="lr > 0"):
        SGD(params, [WTE], lr=0.0)
    with pytest.raises(ValueError, match="weight_decay >= 0"):
        AdamW(params, [WTE], weight_decay=-0.1)


def test_loraplus_trains_lora_B_with_a_multiple_of_the_learning_rate():
    from minilora.config import GPTConfig
    from minilora.jobs.finetune import make_optimizer
    from minilora.lora.config import LoraConfig
    from minilora.lora.model import add_lora
    from minilora.training.loop import TrainSettings

    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=5)
    model = add_lora(GPT(config, init_params(config, dtype=np.float64)), LoraConfig(r=2, init="random"))
    settings = TrainSettings(lr=1e-2, weight_decay=0.0)
    plain, plus = (make_optimizer(model, settings, ratio) for ratio in (1.0, 16.0))
    assert set(plus.lr_scale) == {name for name in model.trainable_names if name.endswith("lora_B")}
    grads = {name: np.ones_like(model.params[name]) for name in model.trainable_names}
    before = {name: model.params[name].copy() for name in model.trainable_names}
    plus.step(grads)
    for name in model.trainable_names:
        # Adam's first step moves every entry by lr * scale (m_hat / sqrt(v_hat) = 1 for a constant gradient)
        expected_step = 1e-2 * (16.0 if name.endswith("lora_B") else 1.0)
        np.testing.assert_allclose(before[name] - model.params[name], expected_step, rtol=1e-6)
    assert plain.lr_scale == {name: 1.0 for name in plus.lr_scale}


def test_lr_scale_for_an_untrained_name_is_refused():
    params = {"w": np.zeros(2)}
    with pytest.raises(KeyError, match="lr_scale names parameters the optimiser does not train"):
        AdamW(params, ["w"], lr_scale={"v": 2.0})
