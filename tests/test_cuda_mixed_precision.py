"""Mixed precision on the GPU: bf16 arrays through the fused kernels and cuBLAS, float32 arithmetic inside.

Two kinds of check:
  1. Per kernel, against the readable layer run by NumPy in float64 on the very same numbers (the
     bf16 inputs, converted exactly). A kernel over bf16 arrays reads them into float32 and rounds
     once, where it stores, so its outputs are the exact answer rounded to bf16 (relative error up
     to 2^-8 = 0.4%, plus float32 sums): RTOL 1e-2. Where a result is stored in float32 (the loss,
     LayerNorm's rstd, a product with ``out_dtype=float32``) it must match at float32 tolerances.
  2. The whole step: a small GPT's LoRA fine-tuning with a bf16 base and activations against the
     float32 path from the same (bf16-representable) weights, over 200 steps: the two loss curves
     agree within LOSS_CURVE_RTOL = 2% at every step, and both learn.
These tests run only where CuPy and a GPU are present (they skip elsewhere, e.g. in CPU-only CI).
"""

import math

import numpy as np
import pytest
from lora_loss_curve import fast_lora_losses

from minilora import layers as ref
from minilora.backend import float_dtype, host_rng, to_device, to_numpy
from minilora.config import get_preset
from minilora.fast.cuda import blas, use_cublas
from minilora.fast.cuda.kernels import attention as fused_attention
from minilora.fast.cuda.kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward
from minilora.fast.cuda.kernels.gelu import gelu_backward, gelu_forward
from minilora.fast.cuda.kernels.layernorm import layernorm_backward, layernorm_forward
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params

pytest.importorskip("ml_dtypes")
pytestmark = pytest.mark.gpu

use_cublas()  # bf16 products go through minilora's cuBLAS handle (CuPy's matmul has no bf16 path)
BF16 = float_dtype("bfloat16")
BF16_RTOL = 1e-2  # outputs rounded once to bf16 (2^-8 relative), see the docstring
FLOAT32_RTOL = 1e-5
LOSS_CURVE_RTOL = 0.02
STEPS = 200


def bf16_inputs(*shape, seed=0, scale=1.0):
    """Random numbers rounded to bf16: on the GPU in bf16, and the same numbers in float64 on the host."""
    values = (scale * host_rng(seed).standard_normal(shape)).astype(BF16)
    return to_device(values, "cuda"), values.astype(np.float64)


def assert_close(got, want, rtol, n_terms=1):
    got, want = to_numpy(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * math.sqrt(n_terms) * scale / 10)


@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_bf16_products_sum_in_float32(out_dtype):
    a, a64 = bf16_inputs(3, 70, 300, seed=1)
    b, b64 = bf16_inputs(300, 50, seed=2)
    got = blas.matmul(a, b, out_dtype=None if out_dtype is None else np.float32)
    assert got.dtype == (BF16 if out_dtype is None else np.float32)
    # bf16 x bf16 is exact in float32; only the float32 sums (and a bf16 store) round
    assert_close(got, a64 @ b64, BF16_RTOL if out_dtype is None else FLOAT32_RTOL, n_terms=300)
    bt, bt64 = bf16_inputs(50, 300, seed=3)
    assert_close(blas.matmul(a, bt.T), a64 @ bt64.T, BF16_RTOL, n_terms=300)  # a transposed view in place


def test_bf16_layernorm_in_float32_arithmetic():
    x, x64 = bf16_inputs(6, 9, 200, seed=4, scale=3.0)
    w, w64 = bf16_inputs(200, seed=5)
    b, b64 = bf16_inputs(200, seed=6)
    out, cache = layernorm_forward(x, w, b)
    want, want_cache = ref.layernorm_forward(x64, w64, b64)
    assert out.dtype == BF16 and cache.rstd.dtype == np.float32
    assert_close(out, want, BF16_RTOL, n_terms=200)
    assert_close(cache.rstd, want_cache.rstd, FLOAT32_RTOL, n_terms=200)
    dout, dout64 = bf16_inputs(6, 9, 200, seed=7)
    dx, dw, db = layernorm_backward(dout, cache)
    want_dx, want_dw, want_db = ref.layernorm_backward(dout64, want_cache)
    assert_close(dx, want_dx, 3 * BF16_RTOL, n_terms=200)  # from the bf16-rounded xhat of the cache
    assert_close(dw, want_dw, 3 * BF16_RTOL, n_terms=54)
    assert_close(db, want_db, BF16_RTOL, n_terms=54)


@pytest.mark.parametrize("shape", [(5, 333), (8, 64)])  # one element a thread; 16-byte vectors
def test_bf16_gelu_both_ways(shape):
    x, x64 = bf16_inputs(*shape, seed=8, scale=2.0)
    out, cache = gelu_forward(x)
    assert out.dtype == BF16
    assert_close(out, ref.gelu_forward(x64)[0], BF16_RTOL)
    dout, dout64 = bf16_inputs(*shape, seed=9)
    assert_close(gelu_backward(dout, cache), ref.gelu_backward(dout64, ref.gelu_forward(x64)[1]), BF16_RTOL)


def test_bf16_cross_entropy_loss_is_float32():
    logits, logits64 = bf16_inputs(4, 16, 256, seed=10, scale=4.0)
    targets = host_rng(11).integers(0, 256, (4, 16))
    loss, cache = cross_entropy_forward(logits, to_device(targets, "cuda"))
    want, want_cache = ref.cross_entropy_forward(logits64, targets)
    assert loss.dtype == np.float32
    assert_close(loss, want, FLOAT32_RTOL, n_terms=256)  # exact inputs, float32 arithmetic: float32 answer
    dlogits = cross_entropy_backward(1.0, cache)
    assert dlogits.dtype == BF16
    assert_close(dlogits, ref.cross_entropy_backward(1.0, want_cache), BF16_RTOL, n_terms=256)


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("T", [50, 130])
def test_bf16_attention_against_float64(T, flash, monkeypatch):
    monkeypatch.setattr(fused_attention, "USE_FLASH", flash)  # the cuBLAS path and the flash kernel
    B, H, hs = 2, 3, 32
    qkv, qkv64 = bf16_inputs(B, T, 3 * H * hs, seed=12)
    y, cache = fused_attention.attention_forward(qkv, H)
    want, want_cache = ref.attention_forward(qkv64, H)
    assert y.dtype == BF16
    # the scores and probabilities are stored in bf16 before they meet V: a few bf16 roundings deep
    assert_close(y, want, 3 * BF16_RTOL, n_terms=T)
    dout, dout64 = bf16_inputs(B, T, H * hs, seed=13)
    assert_close(
        fused_attention.attention_backward(dout, cache),
        ref.attention_backward(dout64, want_cache),
        5 * BF16_RTOL,
        n_terms=T,
    )


def train_losses(dtype: str, steps: int = STEPS):
    """Losses of LoRA fine-tuning a small GPT on the fast GPU path, from bf16-representable weights."""
    config = get_preset("small")
    host = init_params(config, seed=3)
    params = {name: to_device(value.astype(BF16).astype(dtype), "cuda") for name, value in host.items()}
    model = add_lora(GPT(config, params), LoraConfig(r=8, target_modules=("c_attn", "attn.c_proj")), seed=1)
    losses = fast_lora_losses(model, steps, alphabet=64, data_seed=5)
    trainable = {name: model.params[name].dtype for name in model.trainable_names}
    return losses, trainable


def test_bf16_lora_training_follows_the_float32_loss_curve():
    losses32, _ = train_losses("float32")
    losses16, trainable = train_losses("bfloat16")
    assert all(dtype == np.float32 for dtype in trainable.values())  # float32 adapters (masters)
    assert np.all(np.isfinite(losses16))
    rel = np.abs(losses16 - losses32) / losses32
    print(f"bf16 vs float32 over {STEPS} steps: max rel diff {rel.max():.4f}, final {rel[-1]:.4f}")
    assert rel.max() <= LOSS_CURVE_RTOL
    assert losses16[-20:].mean() < losses16[:5].mean() - 0.1  # it learns (random tokens: slowly)
