"""The CPU fast path's layer functions (minilora.fast.cpu.ops) against the reference layers, in float64.

Each in-place pair must compute the reference's numbers (to rounding) from the same inputs and
return the same cache contents, and its backward must also pass a finite-difference check of its
own, so that a bug shared with the reference could not hide.
"""

from dataclasses import fields

import numpy as np
import pytest

from minilora import layers as ref
from minilora.config import get_preset
from minilora.fast import accelerate, fast_ops
from minilora.fast.cpu import llama_ops
from minilora.fast.cpu import ops as fast
from minilora.fast.cpu.ops import CPU_OPS
from minilora.gradcheck import check_layer
from minilora.model import GPT, init_params
from minilora.optim import AdamW
from minilora.training.step import train_step

TOL = 1e-12  # relative to the largest value: the two differ only in the order of float64 roundings


def assert_same(got, want):
    if want is None:
        assert got is None
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * max(float(np.max(np.abs(want))), 1.0))


def assert_same_cache(got, want):
    assert type(got) is type(want)
    for a, b in zip(got, want):
        if hasattr(b, "shape"):
            assert_same(a, b)
        else:
            assert a == b


@pytest.fixture
def rng():
    return np.random.default_rng(17)


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: far into both tails of the tanh
def test_gelu_matches_the_reference(rng, scale):
    x = scale * rng.standard_normal((3, 5, 7))
    out, cache = fast.gelu_forward(x)
    want, want_cache = ref.gelu_forward(x)
    assert_same(out, want)
    assert_same_cache(cache, want_cache)
    dout = rng.standard_normal(x.shape)
    assert_same(fast.gelu_backward(dout, cache), ref.gelu_backward(dout, want_cache))
    check_layer(fast.gelu_forward, fast.gelu_backward, {"x": x / scale}, ("x",)).assert_ok(1e-7)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1e4])  # a large mean: the centring must come before the variance
def test_layernorm_matches_the_reference(rng, bias, offset):
    x = offset + rng.standard_normal((2, 4, 9))
    w, b = rng.standard_normal(9), rng.standard_normal(9) if bias else None
    out, cache = fast.layernorm_forward(x, w, b)
    want, want_cache = ref.layernorm_forward(x, w, b)
    assert_same(out, want)
    assert_same_cache(cache, want_cache)
    dout = rng.standard_normal(x.shape)
    for got, expected in zip(fast.layernorm_backward(dout, cache), ref.layernorm_backward(dout, want_cache)):
        assert_same(got, expected)
    inputs = {"x": x - offset, "w": w, **({"b": b} if bias else {})}
    grads = ("x", "w", "b") if bias else ("x", "w")
    backward = (
        fast.layernorm_backward if bias else (lambda dout, cache: fast.layernorm_backward(dout, cache)[:2])
    )
    check_layer(fast.layernorm_forward, backward, inputs, grads).assert_ok(1e-7)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("spread", [1.0, 40.0])  # 40: scores far apart, the softmax's shift matters
def test_attention_matches_the_reference(rng, p, spread):
    B, T, H, hs = 2, 6, 3, 4
    qkv = spread * rng.standard_normal((B, T, 3 * H * hs))
    mask = ref.make_dropout_mask(rng, (B, H, T, T), p, np.float64) if p else None
    out, cache = fast.attention_forward(qkv, H, mask)
    want, want_cache = ref.attention_forward(qkv, H, mask)
    assert_same(out, want)
    assert_same_cache(cache, want_cache)
    dout = rng.standard_normal(out.shape)
    assert_same(fast.attention_backward(dout, cache), ref.attention_backward(dout, want_cache))
    inputs = {"qkv": qkv / spread, "n_head": H, "dropout_mask": mask}
    check_layer(fast.attention_forward, fast.attention_backward, inputs, ("qkv",)).assert_ok(1e-7)


@pytest.mark.parametrize("spread", [1.0, 1000.0])  # 1000: exp would overflow without the shift
def test_cross_entropy_matches_the_reference(rng, spread):
    logits, targets = spread * rng.standard_normal((3, 4, 11)), rng.integers(0, 11, (3, 4))
    loss, cache = fast.cross_entropy_forward(logits, targets)
    want, want_cache = ref.cross_entropy_forward(logits, targets)
    assert float(loss) == pytest.approx(float(want), rel=TOL)
    assert_same_cache(cache, want_cache)
    assert_same(fast.cross_entropy_backward(0.7, cache), ref.cross_entropy_backward(0.7, want_cache))
    inputs = {"logits": logits / spread, "targets": targets}
    check_layer(fast.cross_entropy_forward, fast.cross_entropy_backward, inputs, ("logits",)).assert_ok(1e-7)


@pytest.mark.parametrize("scale", [1.0, 50.0])  # 50: sigmoid saturates at both ends, exp(50) is huge
def test_swiglu_matches_the_reference(rng, scale):
    g, u = scale * rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 5, 6))
    out, cache = llama_ops.swiglu_forward(g, u)
    want, want_cache = ref.swiglu_forward(g, u)
    assert_same(out, want)
    assert_same_cache(cache, want_cache)
    dout = rng.standard_normal(g.shape)
    for got, expected in zip(llama_ops.swiglu_backward(dout, cache), ref.swiglu_backward(dout, want_cache)):
        assert_same(got, expected)
    inputs = {"g": g / scale, "u": u}
    check_layer(llama_ops.swiglu_forward, llama_ops.swiglu_backward, inputs, ("g", "u")).assert_ok(1e-7)


@pytest.mark.parametrize("magnitude", [1.0, 1e3])
def test_rmsnorm_matches_the_reference(rng, magnitude):
    x, w = magnitude * rng.standard_normal((2, 4, 9)), rng.standard_normal(9)
    out, cache = llama_ops.rmsnorm_forward(x, w, 1e-5)
    want, want_cache = ref.rmsnorm_forward(x, w, 1e-5)
    assert_same(out, want)
    assert_same_cache(cache, want_cache)
    dout = rng.standard_normal(x.shape)
    for got, expected in zip(llama_ops.rmsnorm_backward(dout, cache), ref.rmsnorm_backward(dout, want_cache)):
        assert_same(got, expected)
    inputs = {"x": x / magnitude, "w": w, "eps": 1e-5}
    check_layer(llama_ops.rmsnorm_forward, llama_ops.rmsnorm_backward, inputs, ("x", "w")).assert_ok(1e-7)


@pytest.mark.parametrize(("H", "H_kv", "p"), [(6, 2, 0.0), (4, 4, 0.0), (6, 3, 0.25)])
def test_gqa_attention_matches_the_reference(rng, H, H_kv, p):
    B, T, hs = 2, 7, 4
    q, k, v = (30.0 * rng.standard_normal((B, heads, T, hs)) for heads in (H, H_kv, H_kv))
    mask = ref.make_dropout_mask(rng, (B, H, T, T), p, np.float64) if p else None
    out, cache = llama_ops.gqa_attention_forward(q, k, v, mask)
    want, want_cache = ref.gqa_attention_forward(q, k, v, mask)
    assert_same(out, want)
    assert_same_cache(cache, want_cache)
    dout = rng.standard_normal(out.shape)
    got = llama_ops.gqa_attention_backward(dout, cache)
    for g, expected in zip(got, ref.gqa_attention_backward(dout, want_cache)):
        assert_same(g, expected)
    inputs = {"q": q / 30, "k": k / 30, "v": v, "dropout_mask": mask}
    check_layer(
        llama_ops.gqa_attention_forward, llama_ops.gqa_attention_backward, inputs, ("q", "k", "v")
    ).assert_ok(1e-7)


def test_cpu_ops_swap_pairs_and_leave_the_rest_to_the_reference():
    assert fast_ops(np) is CPU_OPS and CPU_OPS.name == "cpu"
    swapped = {
        f.name for f in fields(CPU_OPS) if getattr(CPU_OPS, f.name) is not getattr(ref.REFERENCE_OPS, f.name)
    }
    assert swapped == {"name"} | {
        f"{layer}_{way}"
        for layer in ("gelu", "layernorm", "attention", "cross_entropy", "swiglu", "rmsnorm", "gqa_attention")
        for way in ("forward", "backward")
    }


def perturbed(config, seed=0):
    params = init_params(config, seed=seed, dtype=np.float64)
    noise = np.random.default_rng(seed + 1)
    for value in params.values():
        value += 0.1 * noise.standard_normal(value.shape)
    return GPT(config, params)


def test_a_model_with_the_cpu_ops_computes_the_reference_logits_loss_and_gradients():
    config = get_preset("tiny", dropout=0.1)
    reference, model = perturbed(config), perturbed(config)
    model.ops = CPU_OPS
    idx, targets = np.random.default_rng(3).integers(0, 256, (2, 2, 16))
    results = []
    for m in (reference, model):
        logits, loss, cache = m.forward(idx, targets, dropout_rng=np.random.default_rng(4))
        results.append((logits, float(loss), m.backward(cache)))
    (want_logits, want_loss, want_grads), (logits, loss, grads) = results
    assert_same(logits, want_logits)
    assert loss == pytest.approx(want_loss, rel=TOL)
    assert set(grads) == set(want_grads)
    for name in want_grads:
        assert_same(grads[name], want_grads[name])


def test_a_lora_llama_with_the_cpu_ops_computes_the_reference_loss_and_gradients():
    from minilora.llama import Llama, LlamaConfig, init_llama_params
    from minilora.lora.config import LoraConfig
    from minilora.lora.model import add_lora

    config = LlamaConfig(
        n_layer=2, n_head=6, n_kv_head=2, n_embd=24, ffn_hidden=40, vocab_size=50, block_size=9
    )
    models = []
    for _ in range(2):
        params = init_llama_params(config, seed=4, dtype=np.float64)
        models.append(
            add_lora(
                Llama(config, params), LoraConfig(r=2, target_modules="all-linear", init="random"), seed=5
            )
        )
    models[1].ops = CPU_OPS
    idx, targets = np.random.default_rng(6).integers(0, 50, (2, 3, 9))
    (want_logits, want_loss, want_cache), (logits, loss, cache) = (m.forward(idx, targets) for m in models)
    assert_same(logits, want_logits)
    assert float(loss) == pytest.approx(float(want_loss), rel=TOL)
    want_grads, grads = models[0].backward(want_cache), models[1].backward(cache)
    assert set(grads) == set(want_grads)
    for name in want_grads:
        assert_same(grads[name], want_grads[name])


def test_the_accelerated_cpu_step_trains_like_the_reference_step():
    config = get_preset("tiny")
    models = [perturbed(config, seed=2) for _ in range(2)]
    optimizers = [AdamW(m.params, m.trainable_names, lr=3e-3, weight_decay=0.1) for m in models]
    step = accelerate(models[1], optimizers[1], grad_clip=1.0, shards=2)
    assert models[1].ops is CPU_OPS and models[0].ops is ref.REFERENCE_OPS
    x, y = np.random.default_rng(5).integers(0, 256, (2, 4, 32))
    for _ in range(3):
        want = train_step(models[0], optimizers[0], x, y, None, 1.0)
        got = step(models[1], optimizers[1], x, y, None, 1.0)
        assert float(got) == pytest.approx(float(want), rel=1e-10)
    for name, value in models[0].params.items():
        np.testing.assert_allclose(models[1].params[name], value, rtol=1e-8, atol=1e-11, err_msg=name)
