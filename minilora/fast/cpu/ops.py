"""The layer functions of a CPU training step, rewritten to make fewer passes over memory.

NumPy evaluates ``0.5 * x * (1.0 + t)`` one operator at a time, each into a fresh temporary the
size of x. On the CPU a training step is bound by those trips to memory as much as by arithmetic
(the MLP's hidden activations of a medium step are 100 MB each). The functions here compute the same
formulas as the reference layers in ``minilora.layers`` with in-place passes over reused buffers,
``einsum`` for row dot products (no squared temporary), and the softmax backward in the buffer of
its input. The attention's softmax and its backward are llama_ops' grouped-query ones: GPT-2's
multi-head attention is their H_kv = H case. They return the reference's own cache types, and
``CPU_OPS`` swaps each forward together with its backward. ``tests/test_fast_cpu_ops.py`` checks
every pair against the reference in float64.
"""

from __future__ import annotations

from dataclasses import replace

from ...backend import get_xp
from ...layers import REFERENCE_OPS, AttentionCache, CrossEntropyCache, GeluCache, LayerNormCache
from ...layers.attention import merge_heads, split_heads
from ...layers.cross_entropy import IGNORE, scored_weights
from ...layers.gelu import GELU_CUBIC, GELU_SQRT_2_OVER_PI
from ...layers.gqa_attention import to_heads
from ...layers.layernorm import LAYERNORM_EPS
from . import llama_ops


def gelu_forward(x):
    """GELU (tanh form) in place on one buffer: u = x (k + k c x^2), t = tanh(u), out = 0.5 x (1 + t)."""
    xp = get_xp(x)
    t = x * x
    t *= GELU_SQRT_2_OVER_PI * GELU_CUBIC
    t += GELU_SQRT_2_OVER_PI
    t *= x  # u = sqrt(2/pi) (x + 0.044715 x^3)
    xp.tanh(t, out=t)  # t = tanh(u)
    out = t * 0.5
    out += 0.5
    out *= x  # 0.5 x (1 + t)
    return out, GeluCache(x=x, t=t)


def gelu_backward(dout, cache: GeluCache):
    """dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx), in two reused buffers."""
    x, t = cache.x, cache.t
    du_dx = x * x
    du_dx *= 3.0 * GELU_CUBIC * GELU_SQRT_2_OVER_PI
    du_dx += GELU_SQRT_2_OVER_PI  # du/dx
    grad = t * t
    grad -= 1.0
    grad *= -0.5  # 0.5 (1 - t^2)
    grad *= x
    grad *= du_dx  # the tanh's term: 0.5 x (1 - t^2) du/dx
    half_t = get_xp(t).multiply(t, 0.5, out=du_dx)  # the buffer again, for the factor's term 0.5 (1 + t)
    grad += half_t
    grad += 0.5
    grad *= dout
    return grad


def layernorm_forward(x, w, b=None, eps: float = LAYERNORM_EPS):
    """LayerNorm with the row's sum of squares by einsum and xhat scaled in place."""
    xp = get_xp(x)
    C = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xhat = x - mean  # (..., C), centred here and scaled in place below
    var = xp.einsum("...c,...c->...", xhat, xhat)[..., None] / C  # (..., 1)
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    xhat *= rstd
    out = xhat * w
    if b is not None:
        out += b
    return out, LayerNormCache(xhat=xhat, rstd=rstd, w=w, has_bias=b is not None)


def layernorm_backward(dout, cache: LayerNormCache):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), built in the buffer of dxhat."""
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    xp = get_xp(xhat)
    C = xhat.shape[-1]
    dxhat = dout * w  # (..., C)
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)  # (..., 1)
    mean_dxhat_xhat = xp.einsum("...c,...c->...", dxhat, xhat)[..., None] / C  # (..., 1)
    dx = dxhat
    dx -= mean_dxhat
    dx -= xhat * mean_dxhat_xhat
    dx *= rstd
    rows = (-1, C)
    dw = xp.einsum("nc,nc->c", dout.reshape(rows), xhat.reshape(rows))  # (C,)
    db = dout.reshape(rows).sum(axis=0) if cache.has_bias else None  # (C,)
    return dx, dw, db


def attention_forward(qkv, n_head: int, dropout_mask=None, example_start=None):
    """Causal self-attention as grouped-query attention with H_kv = H (llama_ops: the softmax in place)."""
    q, k, v = split_heads(qkv, n_head)
    y, cache = llama_ops.gqa_attention_forward(q, k, v, dropout_mask, example_start)  # (B, H, T, hs)
    return merge_heads(y), AttentionCache(*cache)


def attention_backward(dout, cache: AttentionCache):
    """llama_ops' grouped-query backward with H_kv = H, its gradients written into the layout of qkv."""
    xp = get_xp(dout)
    B, H, T, hs = cache.q.shape
    dq, dk, dv = llama_ops.gqa_attention_backward(to_heads(dout, H), cache)  # (B, H, T, hs) each
    dqkv = xp.empty((B, T, 3, H, hs), dtype=dout.dtype)
    dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)  # (B, T, H, hs)
    dqkv[:, :, 1] = dk.transpose(0, 2, 1, 3)
    dqkv[:, :, 2] = dv.transpose(0, 2, 1, 3)
    return dqkv.reshape(B, T, 3 * H * hs)


def cross_entropy_forward(logits, targets):
    """Softmax cross-entropy with exp and the normalisation in the buffer of the shifted logits.

    The weighted mean over the scored targets, as the reference's (IGNORE targets weigh 0).
    """
    xp = get_xp(logits)
    logits_shape = logits.shape
    V = logits_shape[-1]
    logits = logits.reshape(-1, V)  # (N, V)
    targets = targets.reshape(-1)  # (N,)
    weights = scored_weights(targets, logits.dtype)  # (N,)
    targets = xp.where(targets == IGNORE, 0, targets)
    shifted = logits - logits.max(axis=-1, keepdims=True)  # (N, V)
    target_logit = xp.take_along_axis(shifted, targets[:, None], axis=-1)[:, 0]  # (N,)
    probs = xp.exp(shifted, out=shifted)  # unnormalised for now
    sum_exp = probs.sum(axis=-1, keepdims=True)  # (N, 1)
    loss = (weights * (xp.log(sum_exp[:, 0]) - target_logit)).sum()
    probs /= sum_exp
    return loss, CrossEntropyCache(probs=probs, targets=targets, weights=weights, logits_shape=logits_shape)


def cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """dlogits = dloss * weights * (probs - onehot(targets)), built in the buffer of probs.

    The (N, V) probabilities are the largest array of a step (V = 49,152 for SmolLM2), and nothing
    reads them after this: the cache serves one backward, as a training step's does.
    """
    xp = get_xp(cache.probs)
    N = cache.probs.shape[0]
    dlogits = cache.probs  # (N, V), overwritten
    dlogits[xp.arange(N), cache.targets] -= 1.0
    dlogits *= dloss * cache.weights[:, None]
    return dlogits.reshape(cache.logits_shape)


CPU_OPS = replace(
    REFERENCE_OPS,
    name="cpu",
    gelu_forward=gelu_forward,
    gelu_backward=gelu_backward,
    layernorm_forward=layernorm_forward,
    layernorm_backward=layernorm_backward,
    attention_forward=attention_forward,
    attention_backward=attention_backward,
    cross_entropy_forward=cross_entropy_forward,
    cross_entropy_backward=cross_entropy_backward,
    rmsnorm_forward=llama_ops.rmsnorm_forward,
    rmsnorm_backward=llama_ops.rmsnorm_backward,
    swiglu_forward=llama_ops.swiglu_forward,
    swiglu_backward=llama_ops.swiglu_backward,
    gqa_attention_forward=llama_ops.gqa_attention_forward,
    gqa_attention_backward=llama_ops.gqa_attention_backward,
)
