"""LoRA's layer on the GPU with its scale and adds folded into cuBLAS products (minilora.fast.cuda.lora).

Checked against the reference layer (minilora.lora.layer) run by NumPy in float64 on the same numbers:
  - float64 arrays: the same math term for term, so agreement to 1e-12;
  - a bf16 base with float32 factors: the products take bf16 operands (the factors rounded to bf16,
    as autocast does) and sum in float32, so outputs agree at bf16's 1e-2; the factors' gradients
    come back in float32;
  - the products' own alpha and accumulate (beta = 1) against NumPy;
  - a whole adapted GPT in float64 on the GPU: accelerate() hands it the fused layer, and its
    gradients equal the reference's.
These tests run only where CuPy and a GPU are present (they skip elsewhere, e.g. in CPU-only CI).
"""

import numpy as np
import pytest

from minilora.backend import host_rng, to_device, to_numpy
from minilora.config import GPTConfig
from minilora.fast import accelerate
from minilora.fast.cuda import blas, use_cublas
from minilora.fast.cuda import lora as fused
from minilora.fast.cuda.ops import CUDA_LORA_OPS
from minilora.jobs.finetune import make_optimizer
from minilora.lora import layer as reference
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.lora.ops import REFERENCE_LORA_OPS
from minilora.model import GPT, init_params
from minilora.training.loop import TrainSettings

pytestmark = pytest.mark.gpu

use_cublas()
N_ROWS, C_IN, C_OUT, RANK, SCALE = (3, 17), 24, 40, 4, 2.0


def rel_err(got, want):
    got, want = to_numpy(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def layer_inputs(seed=0, p=0.0):
    rng = host_rng(seed)
    x = rng.standard_normal((*N_ROWS, C_IN))
    W = rng.standard_normal((C_IN, C_OUT)) / np.sqrt(C_IN)
    b = rng.standard_normal(C_OUT)
    A = rng.standard_normal((RANK, C_IN)) / np.sqrt(C_IN)
    B = rng.standard_normal((C_OUT, RANK))
    dout = rng.standard_normal((*N_ROWS, C_OUT))
    mask = None if p == 0 else (rng.random((*N_ROWS, C_IN)) >= p) / (1 - p)
    return x, W, b, A, B, dout, mask


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("with_bias", [True, False])
def test_float64_fused_layer_equals_the_reference(p, with_bias):
    x, W, b, A, B, dout, mask = layer_inputs(1, p)
    b = b if with_bias else None
    want_y, cache = reference.lora_linear_forward(x, W, b, A, B, SCALE, mask)
    want = reference.lora_linear_backward(dout, cache)
    g = [None if a is None else to_device(a, "cuda") for a in (x, W, b, A, B, dout, mask)]
    y, fused_cache = fused.lora_linear_forward(*g[:5], SCALE, g[6])
    assert isinstance(fused_cache, fused.FusedLoraCache)
    got = fused.lora_linear_backward(g[5], fused_cache)
    assert rel_err(y, want_y) < 1e-12
    for got_grad, want_grad in zip(got, want):
        assert (got_grad is None) == (want_grad is None)
        if want_grad is not None:
            assert rel_err(got_grad, want_grad) < 1e-12


def test_bf16_base_with_float32_factors_matches_float64_at_bf16_tolerance():
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    x, W, b, A, B, dout, _ = layer_inputs(2)
    x, W, b, dout = (a.astype(bf16).astype(np.float64) for a in (x, W, b, dout))  # numbers both sides see
    want_y, cache = reference.lora_linear_forward(x, W, b, A, B, SCALE)
    want_dx, _, want_db, want_dA, want_dB = reference.lora_linear_backward(dout, cache)
    gx, gW, gb, gdout = (to_device(a.astype(bf16), "cuda") for a in (x, W, b, dout))
    gA, gB = (to_device(a.astype(np.float32), "cuda") for a in (A, B))
    y, fused_cache = fused.lora_linear_forward(gx, gW, gb, gA, gB, SCALE)
    dx, dW, db, dA, dB = fused.lora_linear_backward(gdout, fused_cache)
    assert y.dtype == dx.dtype == db.dtype == bf16 and dW is None
    assert dA.dtype == dB.dtype == np.float32  # the factors' gradients in the factors' dtype
    for got, want in ((y, want_y), (dx, want_dx), (db, want_db), (dA, want_dA), (dB, want_dB)):
        assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_products_scale_and_accumulate_in_place(dtype):
    import ml_dtypes

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = host_rng(3)
    a, b, c = (rng.standard_normal(s).astype(dt) for s in ((2, 5, 7), (7, 3), (2, 5, 3)))
    ga, gb, gc = (to_device(v, "cuda") for v in (a, b, c))
    out = blas.matmul(ga, gb, alpha=0.5, accumulate=gc)
    assert out is gc
    want = 0.5 * a.astype(np.float64) @ b.astype(np.float64) + c.astype(np.float64)
    assert rel_err(gc, want) < (1e-2 if dtype == "bfloat16" else 1e-6)
    with pytest.raises(ValueError, match="accumulate"):
        blas.matmul(ga, gb, accumulate=gc[:, :4])


def test_an_adapted_gpt_on_the_gpu_gets_the_fused_layer_and_the_reference_gradients():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    lora_config = LoraConfig(r=4, target_modules=["c_attn", "attn.c_proj", "mlp.c_fc"], init="random")
    rng = host_rng(4)
    x, y = (rng.integers(0, config.vocab_size, (2, config.block_size)) for _ in range(2))

    def gradients(fast: bool):
        model = add_lora(
            GPT(config, init_params(config, seed=0, dtype=np.float64, device="cuda")), lora_config
        )
        if fast:
            accelerate(model, make_optimizer(model, TrainSettings(lr=1e-3)), 1.0, cuda_graph=False)
            assert model.lora_ops is CUDA_LORA_OPS
        else:
            assert model.lora_ops is REFERENCE_LORA_OPS
        return model.backward(model.forward(x, y)[2])

    want, got = gradients(False), gradients(True)
    assert got.keys() == want.keys()
    for name in want:
        assert rel_err(got[name], to_numpy(want[name])) < 1e-10, name
