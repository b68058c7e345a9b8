"""The fused CuPy kernels (minilora.fast.cuda.kernels) against two independent references.

Every kernel is compared with
  1. the readable layer (minilora.layers, minilora.optim) run by CuPy on the GPU, on the very same
     inputs (the reference never dispatches to a kernel: only minilora.fast.cuda.ops.CUDA_OPS does), and
  2. the readable layer run by NumPy in float64 on the host, on the same numbers (the GPU inputs,
     converted), which is the exact answer up to float64 rounding.
The kernels run in float32 and in float64; both are compared with both references.

Tolerance (``assert_close``), elementwise: |got - want| <= RTOL |want| + ATOL sqrt(n) max|want|, where
n is the length of the longest sum behind a value (1 for elementwise kernels, C for LayerNorm, V for
the cross-entropy, T for attention, rows for column sums). Rounding error grows about as sqrt(n) along
a sum, and the second term judges entries that a cancelling sum makes tiny on the scale of the array.
    float32: RTOL 1e-5, ATOL 1e-6     (about 80 and 8 float32 ulps)
    float64: RTOL 1e-12, ATOL 1e-13
These tests run only where CuPy and a GPU are present (they skip elsewhere, e.g. in CPU-only CI).
"""

import math

import numpy as np
import pytest

from minilora import layers as ref
from minilora.backend import device_rng, to_device, to_numpy
from minilora.config import get_preset
from minilora.fast.cuda.kernels import attention as fused_attention
from minilora.fast.cuda.kernels import gqa_attention as fused_gqa
from minilora.fast.cuda.kernels import llama as fused_llama
from minilora.fast.cuda.kernels.adamw import adamw_step_fused
from minilora.fast.cuda.kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward
from minilora.fast.cuda.kernels.gelu import gelu_backward, gelu_forward
from minilora.fast.cuda.kernels.grad_norm import global_grad_norm
from minilora.fast.cuda.kernels.layernorm import layernorm_backward, layernorm_forward
from minilora.fast.cuda.ops import CUDA_OPS
from minilora.fast.cuda.optim import fused_adamw_step, fused_clip_grad_norm
from minilora.model import GPT, init_params
from minilora.optim import AdamW, clip_grad_norm

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

TOLERANCES = {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-13)}  # (RTOL, ATOL), see the docstring
DTYPES = list(TOLERANCES)


def assert_close(got, want, dtype, n_terms=1):
    got, want = to_numpy(got).astype(np.float64), np.asarray(to_numpy(want), dtype=np.float64)
    assert got.shape == want.shape
    rtol, atol = TOLERANCES[dtype]
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * math.sqrt(n_terms) * scale)


def inputs(values, dtype):
    """The values on the GPU in ``dtype``, and the same numbers in float64 on the host."""
    device = to_device(np.asarray(values, dtype=dtype), "cuda")
    return device, to_numpy(device).astype(np.float64)


def reference_on_gpu(function, *args):
    """The readable layer on CuPy arrays: the reference itself, which no kernel replaces."""
    return function(*args)


def test_cuda_ops_swap_whole_pairs_for_the_kernels():
    from dataclasses import fields

    swapped = {
        f.name
        for f in fields(CUDA_OPS)
        if getattr(CUDA_OPS, f.name) is not getattr(ref.REFERENCE_OPS, f.name)
    }
    # Two forwards go alone: the residual add has no backward, and the linear layer's forward (its
    # bias added by a vectorised kernel) makes the reference's own LinearCache for the reference backward.
    forward_only = {"residual_add", "linear_forward"}
    assert swapped == {"name"} | forward_only | {
        f"{layer}_{way}"
        for layer in (
            "gelu",
            "layernorm",
            "attention",
            "cross_entropy",
            "rmsnorm",
            "swiglu",
            "rope",
            "gqa_attention",
        )
        for way in ("forward", "backward")
    }
    assert CUDA_OPS.linear_backward is ref.REFERENCE_OPS.linear_backward
    assert (
        CUDA_OPS.gelu_forward is gelu_forward
        and CUDA_OPS.attention_backward is fused_attention.attention_backward
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(3, 5, 7), (300, 576), (1, 64)]
)  # C = 1 would test cancellation in 1 - xhat^2
def test_rmsnorm(shape, dtype):
    rng = np.random.default_rng(8)
    C, n_rows = shape[-1], math.prod(shape[:-1])
    x, x64 = inputs(2.0 * rng.standard_normal(shape), dtype)
    w, w64 = inputs(1.0 + 0.1 * rng.standard_normal(C), dtype)
    dout, dout64 = inputs(rng.standard_normal(shape), dtype)
    out, cache = fused_llama.rmsnorm_forward(x, w, 1e-5)
    want_out, want_cache = ref.rmsnorm_forward(x64, w64, 1e-5)
    gpu_out, gpu_cache = reference_on_gpu(ref.rmsnorm_forward, x, w, 1e-5)
    for want, want_c in ((want_out, want_cache), (gpu_out, gpu_cache)):
        assert_close(out, want, dtype, n_terms=C)
        assert_close(cache.xhat, want_c.xhat, dtype, n_terms=C)
        assert_close(cache.rstd, want_c.rstd, dtype, n_terms=C)
    want_grads = ref.rmsnorm_backward(dout64, want_cache)
    for got in (fused_llama.rmsnorm_backward(dout, cache), fused_llama.rmsnorm_backward(dout, gpu_cache)):
        assert_close(got[0], want_grads[0], dtype, n_terms=C)  # dx
        assert_close(got[1], want_grads[1], dtype, n_terms=n_rows)  # dw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spread", [1.0, 60.0])  # 60: sigmoid saturates, exp(60) overflows float32
def test_swiglu(spread, dtype):
    rng = np.random.default_rng(9)
    g, g64 = inputs(spread * rng.standard_normal((4, 7, 33)), dtype)
    u, u64 = inputs(rng.standard_normal((4, 7, 33)), dtype)
    dout, dout64 = inputs(rng.standard_normal((4, 7, 33)), dtype)
    out, cache = fused_llama.swiglu_forward(g, u)
    want_out, want_cache = ref.swiglu_forward(g64, u64)
    assert_close(out, want_out, dtype)
    assert_close(cache.sig, want_cache.sig, dtype)
    for got, want in zip(fused_llama.swiglu_backward(dout, cache), ref.swiglu_backward(dout64, want_cache)):
        assert bool(cupy.isfinite(got).all())
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("B", "H", "H_kv", "T", "p"), [(2, 9, 3, 17, 0.0), (1, 4, 4, 64, 0.0), (2, 6, 2, 12, 0.3)]
)
def test_gqa_attention(B, H, H_kv, T, p, dtype):
    rng = np.random.default_rng(10)
    hs = 8  # not a flash head size: the cuBLAS route (the flash route is in test_cuda_llama.py)
    q, q64 = inputs(2.0 * rng.standard_normal((B, H, T, hs)), dtype)
    k, k64 = inputs(2.0 * rng.standard_normal((B, H_kv, T, hs)), dtype)
    v, v64 = inputs(rng.standard_normal((B, H_kv, T, hs)), dtype)
    mask64 = ref.make_dropout_mask(rng, (B, H, T, T), p, np.float64) if p else None
    mask = None if mask64 is None else to_device(mask64.astype(dtype), "cuda")
    dout, dout64 = inputs(rng.standard_normal((B, H, T, hs)), dtype)
    y, cache = fused_gqa.gqa_attention_forward(q, k, v, mask)
    want_y, want_cache = ref.gqa_attention_forward(q64, k64, v64, mask64)
    assert_close(y, want_y, dtype, n_terms=T)
    assert_close(cache.att, want_cache.att, dtype, n_terms=T)
    want_grads = ref.gqa_attention_backward(dout64, want_cache)
    gpu_cache = reference_on_gpu(ref.gqa_attention_forward, q, k, v, mask)[1]
    for got in (
        fused_gqa.gqa_attention_backward(dout, cache),
        fused_gqa.gqa_attention_backward(dout, gpu_cache),
    ):
        for name, g, want in zip("qkv", got, want_grads):
            assert g.shape == want.shape, name
            assert_close(g, want, dtype, n_terms=T * H // H_kv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (1000,), (64, 129)])
def test_gelu(shape, dtype):
    rng = np.random.default_rng(0)
    x, x64 = inputs(2.0 * rng.standard_normal(shape), dtype)
    dout, dout64 = inputs(rng.standard_normal(shape), dtype)
    out, cache = gelu_forward(x)
    assert out.dtype == dtype and not hasattr(cache, "t")  # the fused cache keeps x only
    dx = gelu_backward(dout, cache)
    want_out, want_cache = ref.gelu_forward(x64)
    want_dx = ref.gelu_backward(dout64, want_cache)
    gpu_out, gpu_cache = reference_on_gpu(ref.gelu_forward, x)
    for got, want in (
        (out, want_out),
        (out, gpu_out),
        (dx, want_dx),
        (dx, reference_on_gpu(ref.gelu_backward, dout, gpu_cache)),
    ):
        assert_close(got, want, dtype)


def test_gelu_on_a_strided_view():
    rng = np.random.default_rng(1)
    x, x64 = inputs(rng.standard_normal((6, 40)), "float32")
    out, cache = gelu_forward(x[:, ::3])
    dout, dout64 = inputs(rng.standard_normal(out.shape), "float32")
    want_out, want_cache = ref.gelu_forward(x64[:, ::3])
    assert_close(out, want_out, "float32")
    assert_close(gelu_backward(dout, cache), ref.gelu_backward(dout64, want_cache), "float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, bias",
    [
        ((2, 3, 64), True),
        ((5, 37), True),
        ((4, 100, 96), False),
        ((3, 2000), True),
        ((300, 1024), True),
        ((1, 1), True),
    ],
)
def test_layernorm(shape, bias, dtype):
    rng = np.random.default_rng(2)
    C, n_rows = shape[-1], math.prod(shape[:-1])
    x, x64 = inputs(2.0 * rng.standard_normal(shape) + 1.5, dtype)  # an offset mean, as real activations have
    w, w64 = inputs(1.0 + 0.1 * rng.standard_normal(C), dtype)
    b, b64 = inputs(0.1 * rng.standard_normal(C), dtype) if bias else (None, None)
    dout, dout64 = inputs(rng.standard_normal(shape), dtype)
    out, cache = layernorm_forward(x, w, b)
    grads = layernorm_backward(dout, cache)
    want_out, want_cache = ref.layernorm_forward(x64, w64, b64)
    want_grads = ref.layernorm_backward(dout64, want_cache)
    gpu_out, gpu_cache = reference_on_gpu(ref.layernorm_forward, x, w, b)
    assert cache.rstd.shape == shape[:-1] + (1,) and cache.has_bias == bias
    for want, want_c in ((want_out, want_cache), (gpu_out, gpu_cache)):
        assert_close(out, want, dtype, n_terms=C)
        assert_close(cache.xhat, want_c.xhat, dtype, n_terms=C)
        assert_close(cache.rstd, want_c.rstd, dtype, n_terms=C)
    # the fused backward on its own cache (the reference's type: same contents), against both references
    for got in (grads, layernorm_backward(dout, gpu_cache)):
        for want in (want_grads, reference_on_gpu(ref.layernorm_backward, dout, gpu_cache)):
            assert_close(got[0], want[0], dtype, n_terms=C)  # dx
            assert_close(got[1], want[1], dtype, n_terms=n_rows)  # dw
            assert (got[2] is None) == (not bias)
            if bias:
                assert_close(got[2], want[2], dtype, n_terms=n_rows)  # db


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, spread",
    [((4, 7, 256), 3.0), ((3, 1000), 3.0), ((2, 50257), 3.0), ((513, 33), 3.0), ((6, 300), 200.0)],
)  # exp overflows unless the row max is right
def test_cross_entropy(shape, spread, dtype):
    rng = np.random.default_rng(3)
    V = shape[-1]
    logits, logits64 = inputs(spread * rng.standard_normal(shape), dtype)
    targets64 = rng.integers(0, V, shape[:-1])
    targets = to_device(targets64, "cuda")
    loss, cache = cross_entropy_forward(logits, targets)
    assert isinstance(loss, cupy.ndarray) and loss.shape == () and loss.dtype == dtype  # no host sync
    want_loss, want_cache = ref.cross_entropy_forward(logits64, targets64)
    gpu_loss, gpu_cache = reference_on_gpu(ref.cross_entropy_forward, logits, targets)
    for want, want_c in ((want_loss, want_cache), (gpu_loss, gpu_cache)):
        assert_close(loss, want, dtype, n_terms=V)
        assert_close(cache.probs, want_c.probs, dtype, n_terms=V)
    for dloss in (1.0, cupy.asarray(0.5, dtype=dtype)):  # a Python float, and a 0-d device array
        dlogits = cross_entropy_backward(dloss, cache)
        assert dlogits.shape == shape and dlogits.dtype == dtype
        assert_close(dlogits, ref.cross_entropy_backward(float(dloss), want_cache), dtype, n_terms=V)
        assert_close(
            dlogits, reference_on_gpu(ref.cross_entropy_backward, dloss, gpu_cache), dtype, n_terms=V
        )


def causal_log_sum_exp(qkv64, n_head):
    """(B, H, T): log sum_{j <= i} exp(q_i . k_j / sqrt(hs)), in float64 on the host."""
    B, T, C3 = qkv64.shape
    hs = C3 // (3 * n_head)
    heads = qkv64.reshape(B, T, 3, n_head, hs)
    q, k = heads[:, :, 0].transpose(0, 2, 1, 3), heads[:, :, 1].transpose(0, 2, 1, 3)  # (B, H, T, hs)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)
    above = np.triu_indices(T, 1)  # the future keys
    scores[..., above[0], above[1]] = -np.inf
    peak = scores.max(axis=-1)
    return peak + np.log(np.exp(scores - peak[..., None]).sum(axis=-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["probabilities", "log-sum-exp"])
@pytest.mark.parametrize(
    "B, T, n_head, hs, p", [(2, 1, 2, 8, 0.0), (2, 37, 3, 16, 0.0), (1, 64, 2, 32, 0.1), (2, 33, 4, 8, 0.2)]
)
def test_attention(B, T, n_head, hs, p, variant, dtype, monkeypatch):
    monkeypatch.setattr(fused_attention, "LSE_MIN_T", 1 if variant == "log-sum-exp" else 10**9)
    monkeypatch.setattr(
        fused_attention, "USE_FLASH", False
    )  # the cuBLAS path; flash: test_cuda_flash_attention
    check_attention(B, T, n_head, hs, p, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, p", [(600, 0.0), (513, 0.1)])
def test_attention_on_long_blocks_keeps_the_log_sum_exp(T, p, dtype, monkeypatch):
    monkeypatch.setattr(fused_attention, "LSE_MIN_T", 512)  # these blocks count as long: small, fast tests
    monkeypatch.setattr(fused_attention, "USE_FLASH", False)
    assert T >= fused_attention.LSE_MIN_T
    check_attention(1, T, 2, 16, p, dtype)


def check_attention(B, T, n_head, hs, p, dtype):
    rng = np.random.default_rng(4)
    C = n_head * hs
    qkv, qkv64 = inputs(1.5 * rng.standard_normal((B, T, 3 * C)), dtype)
    dout, dout64 = inputs(rng.standard_normal((B, T, C)), dtype)
    mask = ref.make_dropout_mask(device_rng(cupy, 5), (B, n_head, T, T), p, dtype) if p else None
    mask64 = None if mask is None else to_numpy(mask).astype(np.float64)
    y, cache = fused_attention.attention_forward(qkv, n_head, mask)
    dqkv = fused_attention.attention_backward(dout, cache)
    want_y, want_cache = ref.attention_forward(qkv64, n_head, mask64)
    want_dqkv = ref.attention_backward(dout64, want_cache)
    gpu_y, gpu_cache = reference_on_gpu(ref.attention_forward, qkv, n_head, mask)
    gpu_dqkv = reference_on_gpu(ref.attention_backward, dout, gpu_cache)
    for got, want in ((y, want_y), (y, gpu_y), (dqkv, want_dqkv), (dqkv, gpu_dqkv)):
        assert_close(got, want, dtype, n_terms=T)
    if T >= fused_attention.LSE_MIN_T:  # the log-sum-exp instead of the probabilities
        assert cache.att is None
        assert_close(cache.lse, causal_log_sum_exp(qkv64, n_head), dtype, n_terms=T)
    else:
        assert cache.lse is None
        assert_close(cache.att, want_cache.att, dtype, n_terms=T)


ADAM_SHAPES = {
    "w": (8, 8),
    "bias": (37,),
    "big": (3, 3000),
    "lora_A": (4, 100),
    "lora_B": (100, 4),
    "gain": (1,),
}
ADAM_DECAY = {"w", "big", "lora_B"}
ADAM_LR_SCALE = {"lora_B": 16.0, "bias": 0.5}
BETA1, BETA2, EPS, WEIGHT_DECAY = 0.9, 0.95, 1e-8, 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [False, True])
def test_adamw_fused_step_matches_the_reference_optimizer(dtype, clip):
    rng = np.random.default_rng(6)
    names = list(ADAM_SHAPES)
    fused = {name: inputs(rng.standard_normal(shape), dtype)[0] for name, shape in ADAM_SHAPES.items()}
    on_gpu = {name: array.copy() for name, array in fused.items()}
    on_host = {name: to_numpy(array).astype(np.float64) for name, array in fused.items()}
    optimizers = [
        AdamW(
            params,
            names,
            lr=1.0,
            betas=(BETA1, BETA2),
            eps=EPS,
            weight_decay=WEIGHT_DECAY,
            decay_names=ADAM_DECAY,
            lr_scale=ADAM_LR_SCALE,
        )
        for params in (on_gpu, on_host)
    ]
    exp_avgs = [cupy.zeros_like(fused[name]) for name in names]
    exp_avg_sqs = [cupy.zeros_like(fused[name]) for name in names]
    for step in range(1, 5):
        lr = 1e-2 * (1.0 - 0.15 * step)  # a schedule: another rate every step
        grads = [inputs(rng.standard_normal(ADAM_SHAPES[name]), dtype)[0] for name in names]
        grad_scale = cupy.asarray(0.37, dtype=dtype) if clip else None  # a clip coefficient, on the device
        scaled = grads if grad_scale is None else [g * grad_scale for g in grads]  # what clipping would do
        optimizers[0].step(dict(zip(names, scaled)), lr=lr)
        host_scale = 1.0 if grad_scale is None else float(grad_scale)
        optimizers[1].step(
            {name: to_numpy(g).astype(np.float64) * host_scale for name, g in zip(names, grads)}, lr=lr
        )
        adamw_step_fused(
            [fused[name] for name in names],
            grads,
            exp_avgs,
            exp_avg_sqs,
            lrs=[lr * ADAM_LR_SCALE.get(name, 1.0) for name in names],
            decay=[name in ADAM_DECAY for name in names],
            beta1=BETA1,
            beta2=BETA2,
            eps=EPS,
            weight_decay=WEIGHT_DECAY,
            step=step,
            grad_scale=grad_scale,
        )
        for i, name in enumerate(names):
            for optimizer in optimizers:
                assert_close(fused[name], optimizer.params[name], dtype)
                assert_close(exp_avgs[i], optimizer.state["exp_avg"][name], dtype)
                assert_close(exp_avg_sqs[i], optimizer.state["exp_avg_sq"][name], dtype)


def test_adamw_fused_step_follows_a_new_list_of_tensors():
    """A second list (other arrays, other sizes) must get its own pointer table, not the first one's."""
    rng = np.random.default_rng(7)
    for shapes in ([(8, 8), (5000,)], [(3,), (70, 3), (4097,)]):
        params = {str(i): inputs(rng.standard_normal(shape), "float32")[0] for i, shape in enumerate(shapes)}
        grads = {name: inputs(rng.standard_normal(p.shape), "float32")[0] for name, p in params.items()}
        expected = {name: p.copy() for name, p in params.items()}
        AdamW(expected, list(expected), lr=1e-2, weight_decay=0.0).step(grads)
        adamw_step_fused(
            list(params.values()),
            list(grads.values()),
            [cupy.zeros_like(p) for p in params.values()],
            [cupy.zeros_like(p) for p in params.values()],
            lrs=[1e-2] * len(params),
            decay=[False] * len(params),
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            step=1,
        )
        for name in params:
            assert_close(params[name], expected[name], "float32")


@pytest.mark.parametrize("dtype", DTYPES)
def test_global_grad_norm(dtype):
    rng = np.random.default_rng(8)
    shapes = [(8, 8), (37,), (3, 3000), (1,), (5000,), (4, 100)]
    grads = [inputs((i + 1) * rng.standard_normal(shape), dtype)[0] for i, shape in enumerate(shapes)]
    norm = global_grad_norm(grads)
    assert isinstance(norm, cupy.ndarray) and norm.shape == () and norm.dtype == dtype  # stays on the device
    want = math.sqrt(sum(float((to_numpy(g).astype(np.float64) ** 2).sum()) for g in grads))
    assert_close(norm, want, dtype)
    n_terms = sum(g.size for g in grads)  # the reference adds in the gradients' dtype
    assert_close(norm, cupy.sqrt(sum((g * g).sum() for g in grads)), dtype, n_terms=n_terms)
    assert_close(global_grad_norm(grads[:1] + [g.T for g in grads[1:]]), want, dtype)  # views are fine


def test_the_reference_layers_never_dispatch_to_the_kernels():
    """A CuPy array given to minilora.layers runs the readable code (a student's hole stays a hole)."""
    x = to_device(np.ones((2, 3, 8), dtype=np.float32), "cuda")
    assert ref.gelu_forward(x)[1].t is not None  # the reference keeps tanh(u); the kernel's cache does not
    assert not hasattr(CUDA_OPS.gelu_forward(x)[1], "t")
    qkv = to_device(np.ones((1, fused_attention.LSE_MIN_T, 48), dtype=np.float32), "cuda")
    assert isinstance(ref.attention_forward(qkv, 2)[1], ref.AttentionCache)
    assert CUDA_OPS.attention_forward(qkv, 2)[1].lse is not None


def test_fused_adamw_step_and_clip_match_the_reference_optimizer():
    rng = np.random.default_rng(10)
    names = list(ADAM_SHAPES)
    start = {name: inputs(rng.standard_normal(shape), "float32")[0] for name, shape in ADAM_SHAPES.items()}
    fused_params, ref_params = ({name: a.copy() for name, a in start.items()} for _ in range(2))
    optimizers = [
        AdamW(
            params,
            names,
            lr=1e-2,
            betas=(BETA1, BETA2),
            eps=EPS,
            weight_decay=WEIGHT_DECAY,
            decay_names=ADAM_DECAY,
            lr_scale=ADAM_LR_SCALE,
        )
        for params in (fused_params, ref_params)
    ]
    for step in range(3):
        grads = {name: inputs(rng.standard_normal(ADAM_SHAPES[name]), "float32")[0] for name in names}
        ref_grads = {name: g.copy() for name, g in grads.items()}
        assert_close(
            fused_clip_grad_norm(grads, 1.0), clip_grad_norm(ref_grads, 1.0), "float32", n_terms=10**4
        )
        fused_adamw_step(optimizers[0], grads, lr=1e-2 * (1 - 0.2 * step))
        optimizers[1].step(ref_grads, lr=1e-2 * (1 - 0.2 * step))
    assert optimizers[0].step_count == optimizers[1].step_count == 3
    for name in names:
        assert_close(fused_params[name], ref_params[name], "float32")
        assert_close(
            optimizers[0].state["exp_avg_sq"][name], optimizers[1].state["exp_avg_sq"][name], "float32"
        )


def relative_gap(got, want):
    got, want = to_numpy(got).astype(np.float64), to_numpy(want).astype(np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


@pytest.mark.parametrize("block_size, T, dropout", [(64, 64, 0.0), (64, 50, 0.1), (600, 600, 0.0)])
def test_gpt_step_with_fused_kernels_matches_the_reference_path(block_size, T, dropout, monkeypatch):
    """A whole forward and backward, fused against readable on the GPU (both float32), with the
    tolerances of tests/test_cuda.py: 2e-4 of the largest logit, 1e-3 of each largest gradient.
    T = 600 takes the long-block attention (threshold lowered to 512 here)."""
    monkeypatch.setattr(fused_attention, "LSE_MIN_T", 512)
    config = get_preset("tiny", block_size=block_size, dropout=dropout)
    model = GPT(config, init_params(config, seed=0, device="cuda"))
    idx, targets = np.random.default_rng(9).integers(0, 256, (2, 2, T))

    def step(ops):
        model.ops = ops
        rng = device_rng(cupy, 0, 1) if dropout else None  # the same masks on both paths
        logits, loss, cache = model.forward(idx, targets, dropout_rng=rng)
        return logits, loss, model.backward(cache)

    logits, loss, grads = step(CUDA_OPS)
    want_logits, want_loss, want_grads = step(ref.REFERENCE_OPS)
    assert relative_gap(logits, want_logits) < 2e-4
    assert abs(float(loss) - float(want_loss)) < 1e-4
    assert set(grads) == set(want_grads)
    for name in grads:
        assert relative_gap(grads[name], want_grads[name]) < 1e-3, name
