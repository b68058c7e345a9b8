"""The Llama family's layers for a CPU step, in fewer passes over memory.

The same formulas as ``minilora.layers.swiglu``, ``rmsnorm`` and ``gqa_attention``, rewritten as
in-place passes over reused buffers (see ``ops.py`` for why that pays on the CPU). SwiGLU's gate is
the widest activation of a Llama (I = 1536 channels on SmolLM2 against C = 576), so its sigmoid is
the one to make cheap: sigmoid(g) = (1 + tanh(g / 2)) / 2 is the same function, has no overflow
for any g, and takes one tanh pass instead of the reference's exp, abs, two divisions and a where.
Grouped-query attention does its mask, shift, exp and normalisation in place on the (B, H, T, T)
scores, and the softmax's backward in the buffer of their gradient; its products stack a group's
G query heads as the rows of one matrix (``group_heads``). It is the CPU fast path's one attention:
``ops.attention_*`` run GPT-2's multi-head attention through it as its H_kv = H case.
They return the reference's cache types; ``tests/test_fast_cpu_ops.py`` checks them against it.
"""

from __future__ import annotations

import math

from ...backend import get_xp, matmul
from ...layers.attention import causal_bias, example_bias
from ...layers.gqa_attention import GQAAttentionCache, check_heads, group_heads, ungroup_heads
from ...layers.rmsnorm import RMSNormCache
from ...layers.swiglu import SwiGLUCache


def swiglu_forward(g, u):
    """out = g * sigmoid(g) * u, with sigmoid(g) = 0.5 + 0.5 tanh(g / 2) built in one buffer."""
    xp = get_xp(g)
    sig = g * 0.5
    xp.tanh(sig, out=sig)
    sig *= 0.5
    sig += 0.5
    out = g * sig
    out *= u
    return out, SwiGLUCache(g=g, u=u, sig=sig)


def swiglu_backward(dout, cache: SwiGLUCache):
    """du = dout * g * sig; dg = dout * u * sig * (1 + g (1 - sig)), each in one buffer."""
    g, u, sig = cache.g, cache.u, cache.sig
    du = dout * g
    du *= sig
    dg = 1.0 - sig
    dg *= g
    dg += 1.0
    dg *= sig  # silu'(g)
    dg *= u
    dg *= dout
    return dg, du


def rmsnorm_forward(x, w, eps: float):
    """y = x * rstd * w, with each row's sum of squares by einsum (no squared temporary)."""
    xp = get_xp(x)
    C = x.shape[-1]
    ms = xp.einsum("...c,...c->...", x, x)[..., None] / C  # (..., 1)
    rstd = 1.0 / xp.sqrt(ms + eps)  # (..., 1)
    xhat = x * rstd
    out = xhat * w
    return out, RMSNormCache(xhat=xhat, rstd=rstd, w=w)


def rmsnorm_backward(dout, cache: RMSNormCache):
    """dx = rstd * (dxhat - xhat * mean(dxhat * xhat)) built in the buffer of dxhat; dw by einsum."""
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    xp = get_xp(xhat)
    C = xhat.shape[-1]
    dxhat = dout * w  # (..., C)
    mean_dxhat_xhat = xp.einsum("...c,...c->...", dxhat, xhat)[..., None] / C  # (..., 1)
    dx = dxhat
    dx -= xhat * mean_dxhat_xhat
    dx *= rstd
    dw = xp.einsum("nc,nc->c", dout.reshape(-1, C), xhat.reshape(-1, C))  # (C,), summed over every row
    return dx, dw


def gqa_attention_forward(q, k, v, dropout_mask=None, example_start=None):
    """Grouped-query causal attention with the softmax in place on the scores.   See the reference."""
    xp = get_xp(q)
    H, H_kv = check_heads(q, k, v)
    T = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    q = q * scale
    att = ungroup_heads(matmul(group_heads(q, H_kv), k.swapaxes(-1, -2)), H)  # (B, H, T, T) scores
    att += causal_bias(xp, T, T, att.dtype)
    if example_start is not None:  # packed rows: each token attends within its own example
        att += example_bias(example_start, T, att.dtype)  # (B, 1, T, T), broadcast over the heads
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    att_used = att if dropout_mask is None else att * dropout_mask
    y = ungroup_heads(matmul(group_heads(att_used, H_kv), v), H)  # (B, H, T, hs)
    return y, GQAAttentionCache(q=q, k=k, v=v, att=att, dropout_mask=dropout_mask, scale=scale)


def gqa_attention_backward(dout, cache: GQAAttentionCache):
    """The reference's backward with the softmax backward in the buffer of datt.   Returns (dq, dk, dv)."""
    xp = get_xp(dout)
    q, k, v, att, mask = cache.q, cache.k, cache.v, cache.att, cache.dropout_mask
    H, H_kv = q.shape[1], k.shape[1]
    dy = group_heads(dout, H_kv)  # (B, H_kv, G*T, hs)
    att_used = att if mask is None else att * mask
    datt = ungroup_heads(matmul(dy, v.swapaxes(-1, -2)), H)  # (B, H, T, T)
    dv = matmul(group_heads(att_used, H_kv).swapaxes(-1, -2), dy)  # (B, H_kv, T, hs), summed over the group
    if mask is not None:
        datt *= mask
    datt -= xp.einsum("...j,...j->...", datt, att)[..., None]
    ds = group_heads(xp.multiply(datt, att, out=datt), H_kv)  # ds = att * (datt - sum_j datt att)
    dq = ungroup_heads(matmul(ds, k), H)
    dq *= cache.scale
    dk = matmul(ds.swapaxes(-1, -2), group_heads(q, H_kv))  # (B, H_kv, T, hs), summed over the group
    return dq, dk, dv
