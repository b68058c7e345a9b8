"""The Llama family on the GPU: RoPE and grouped-query flash attention kernels, and mixed precision.

Each kernel is compared with the readable layer (minilora.layers) run by NumPy in float64 on the very
same numbers: float32 kernels at float32 tolerances, bf16 ones at bf16's (a result rounded once to
bf16 is off by up to 2^-8 relative; the attention's probabilities are rounded before they meet V, a
few roundings deep, as in test_cuda_mixed_precision.py). Attention is judged by the relative norm
error ||got - want|| / ||want||, as in test_cuda_flash_attention.py. The whole model is checked twice:
the fast float32 step (flash route included) against the reference step, and 200 LoRA steps over a
bf16 base against the float32 run from the same weights, within LOSS_CURVE_RTOL at every step.
These tests run only where CuPy and a GPU are present (they skip elsewhere, e.g. in CPU-only CI).
"""

import math

import numpy as np
import pytest
from lora_loss_curve import fast_lora_losses

from minilora import layers as ref
from minilora.backend import float_dtype, host_rng, to_device, to_numpy
from minilora.fast import accelerate
from minilora.fast.cuda import use_cublas
from minilora.fast.cuda.graph import GraphedStep
from minilora.fast.cuda.kernels import attention as fused_attention
from minilora.fast.cuda.kernels import gqa_attention as fused_gqa
from minilora.fast.cuda.kernels import llama as fused_llama
from minilora.fast.cuda.kernels import rope as fused_rope
from minilora.jobs.finetune import make_optimizer
from minilora.llama import Llama, LlamaConfig, init_llama_params
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.training.loop import TrainSettings
from minilora.training.step import train_step

pytest.importorskip("ml_dtypes")
pytestmark = pytest.mark.gpu

use_cublas()  # bf16 products go through minilora's cuBLAS handle
BF16 = float_dtype("bfloat16")
RTOL = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 1e-2}  # one rounding of the stored result
NORM_RTOL = {"float32": 2e-5, "bfloat16": 2e-2}  # attention, relative norm error
LOSS_CURVE_RTOL = 0.02
STEPS = 200


def device_inputs(values, dtype):
    """values rounded to dtype on the GPU, and the same numbers in float64 on the host."""
    rounded = np.asarray(values).astype(float_dtype(dtype))
    return to_device(rounded, "cuda"), rounded.astype(np.float64)


def assert_close(got, want, dtype, n_terms=1):
    got, want = to_numpy(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    rtol = RTOL[dtype]
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * math.sqrt(n_terms) * scale / 10)


def norm_error(got, want) -> float:
    got, want = to_numpy(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("pairing", ["half", "adjacent"])
def test_rope_kernel_rotates_strided_heads_like_the_reference(pairing, dtype):
    rng = host_rng(1)
    B, T, H, hs = 2, 37, 3, 16
    projection, projection64 = device_inputs(rng.standard_normal((B, T, H * hs)), dtype)
    x, x64 = ref.to_heads(projection, H), ref.to_heads(projection64, H)  # strided (B, H, T, hs) views
    cos64, sin64 = ref.rope_tables(T, hs, 5, 10000.0, np.float64, np)
    cos, sin = (to_device(t.astype(float_dtype(dtype)), "cuda") for t in (cos64, sin64))
    cos64, sin64 = (to_numpy(t).astype(np.float64) for t in (cos, sin))  # the tables the kernel reads
    out, cache = fused_rope.rope_forward(x, cos, sin, pairing)
    want, want_cache = ref.rope_forward(x64, cos64, sin64, pairing)
    assert out.dtype == x.dtype
    assert_close(out, want, dtype)
    dout, dout64 = device_inputs(rng.standard_normal((B, H, T, hs)), dtype)
    dx = fused_rope.rope_backward(dout, cache)
    assert_close(dx, ref.rope_backward(dout64, want_cache), dtype)
    assert ref.merge_heads(dx).base is not None  # laid out (B, T, H, hs): joining the heads copies nothing


def gqa_inputs(B, H, H_kv, T, hs, dtype, seed):
    rng = host_rng(seed)
    q = device_inputs(2.0 * rng.standard_normal((B, H, T, hs)), dtype)
    k = device_inputs(2.0 * rng.standard_normal((B, H_kv, T, hs)), dtype)
    v = device_inputs(rng.standard_normal((B, H_kv, T, hs)), dtype)
    dout = device_inputs(rng.standard_normal((B, H, T, hs)), dtype)
    return q, k, v, dout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("H", "H_kv", "T", "p"),
    [(9, 3, 37, 0.0), (6, 2, 130, 0.0), (4, 4, 64, 0.0), (4, 1, 65, 0.0), (6, 3, 50, 0.25)],
)  # SmolLM2's 9 over 3; T on and off the 64-row tile; multi-head and multi-query; dropout
def test_gqa_flash_route_matches_the_reference(H, H_kv, T, p, dtype):
    B, hs = 2, 64
    (q, q64), (k, k64), (v, v64), (dout, dout64) = gqa_inputs(B, H, H_kv, T, hs, dtype, seed=H * T)
    mask64 = ref.make_dropout_mask(host_rng(2), (B, H, T, T), p, np.float64) if p else None
    mask = None if mask64 is None else to_device(mask64.astype(np.float32), "cuda")
    y, cache = fused_gqa.gqa_attention_forward(q, k, v, mask)
    assert isinstance(cache, fused_gqa.GQAFlashCache)  # the flash route, not the (B, H, T, T) one
    want_y, want_cache = ref.gqa_attention_forward(q64, k64, v64, mask64)
    assert y.dtype == q.dtype and norm_error(y, want_y) < NORM_RTOL[dtype]
    assert ref.merge_heads(y).base is not None  # y laid out (B, T, H, hs) for o_proj
    grads = fused_gqa.gqa_attention_backward(ref.to_heads(ref.merge_heads(dout), H), cache)
    for name, got, want in zip("qkv", grads, ref.gqa_attention_backward(dout64, want_cache)):
        assert got.dtype == q.dtype, name
        assert norm_error(got, want) < NORM_RTOL[dtype], name


def test_gqa_routes_agree_and_the_switch_turns_flash_off(monkeypatch):
    (q, _), (k, _), (v, _), (dout, _) = gqa_inputs(2, 6, 2, 70, 32, "float32", seed=3)
    flash_y, flash_cache = fused_gqa.gqa_attention_forward(q, k, v)
    monkeypatch.setattr(fused_attention, "USE_FLASH", False)
    plain_y, plain_cache = fused_gqa.gqa_attention_forward(q, k, v)
    assert isinstance(plain_cache, ref.GQAAttentionCache)
    assert norm_error(flash_y, to_numpy(plain_y)) < 2e-5
    for got, want in zip(
        fused_gqa.gqa_attention_backward(dout, flash_cache),
        fused_gqa.gqa_attention_backward(dout, plain_cache),
    ):
        assert norm_error(got, to_numpy(want)) < 2e-5


def test_bf16_rmsnorm_and_swiglu_in_float32_arithmetic():
    rng = host_rng(4)
    x, x64 = device_inputs(3.0 * rng.standard_normal((6, 9, 576)), "bfloat16")
    w, w64 = device_inputs(1.0 + 0.1 * rng.standard_normal(576), "bfloat16")
    out, cache = fused_llama.rmsnorm_forward(x, w, 1e-5)
    want, want_cache = ref.rmsnorm_forward(x64, w64, 1e-5)
    assert out.dtype == BF16 and cache.rstd.dtype == np.float32
    assert_close(out, want, "bfloat16", n_terms=576)
    assert_close(cache.rstd, want_cache.rstd, "float32", n_terms=576)  # exact inputs, float32 sums
    dout, dout64 = device_inputs(rng.standard_normal((6, 9, 576)), "bfloat16")
    dx, dw = fused_llama.rmsnorm_backward(dout, cache)
    want_dx, want_dw = ref.rmsnorm_backward(dout64, want_cache)
    assert_close(dx, want_dx, "bfloat16", n_terms=3 * 576)  # from the bf16-rounded xhat of the cache
    assert_close(dw, want_dw, "bfloat16", n_terms=3 * 54)
    g, g64 = device_inputs(4.0 * rng.standard_normal((4, 96)), "bfloat16")
    u, u64 = device_inputs(rng.standard_normal((4, 96)), "bfloat16")
    out, cache = fused_llama.swiglu_forward(g, u)
    want, want_cache = ref.swiglu_forward(g64, u64)
    assert_close(out, want, "bfloat16")
    dout, dout64 = device_inputs(rng.standard_normal((4, 96)), "bfloat16")
    for got, want in zip(fused_llama.swiglu_backward(dout, cache), ref.swiglu_backward(dout64, want_cache)):
        assert_close(got, want, "bfloat16", n_terms=4)  # sig enters rounded to bf16


CONFIG = LlamaConfig(
    n_layer=2, n_head=6, n_kv_head=2, n_embd=192, ffn_hidden=256, vocab_size=64, block_size=64
)
LORA = LoraConfig(r=8, target_modules=("q_proj", "v_proj"))


def test_the_fast_float32_llama_step_with_flash_gqa_trains_like_the_reference_step():
    lora = LoraConfig(r=4, target_modules=("q_proj", "v_proj", "down_proj"), init="random")
    models = [
        add_lora(Llama(CONFIG, init_llama_params(CONFIG, seed=1, device="cuda")), lora, seed=2) for _ in "ab"
    ]
    optimizers = [make_optimizer(m, TrainSettings(lr=1e-2, weight_decay=0.1)) for m in models]
    step = accelerate(models[1], optimizers[1], grad_clip=1.0, graph_warmup=1)
    assert isinstance(step, GraphedStep)
    rng = host_rng(5)
    for _ in range(4):
        x, y = rng.integers(0, 64, (3, 64)), rng.integers(0, 64, (3, 64))
        want = float(train_step(models[0], optimizers[0], x, y, None, 1.0))
        assert float(step(models[1], optimizers[1], x, y, None, 1.0)) == pytest.approx(want, rel=1e-5)
    for name in models[0].trainable_names:
        np.testing.assert_allclose(to_numpy(models[1].params[name]), to_numpy(models[0].params[name]),
                                   rtol=1e-4, atol=1e-6, err_msg=name)  # fmt: skip


def llama_losses(dtype: str, steps: int = STEPS):
    """Losses of LoRA fine-tuning a small Llama on the fast GPU path, from bf16-representable weights."""
    host = init_llama_params(CONFIG, seed=3)
    params = {name: to_device(value.astype(BF16).astype(np.float32), "cuda") for name, value in host.items()}
    model = add_lora(Llama(CONFIG, params), LORA, seed=1)
    if dtype == "bfloat16":
        model.cast_base(BF16)  # the base in bf16; the adapter keeps float32
    losses = fast_lora_losses(model, steps, alphabet=16, data_seed=6)
    dtypes = {name: model.params[name].dtype for name in model.params}
    return losses, dtypes, model.trainable_names


def test_bf16_llama_lora_training_follows_the_float32_loss_curve():
    losses32, _, _ = llama_losses("float32")
    losses16, dtypes, trainable = llama_losses("bfloat16")
    assert all(dtypes[name] == np.float32 for name in trainable)  # float32 adapters (masters)
    assert all(dtypes[name] == BF16 for name in dtypes if name not in trainable)  # the whole base in bf16
    assert np.all(np.isfinite(losses16))
    rel = np.abs(losses16 - losses32) / losses32
    print(f"Llama bf16 vs float32 over {STEPS} steps: max rel diff {rel.max():.4f}, final {rel[-1]:.4f}")
    assert rel.max() <= LOSS_CURVE_RTOL
    assert losses16[-20:].mean() < losses16[:5].mean() - 0.1  # it learns
