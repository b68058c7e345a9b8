"""The LoRA linear layer: a frozen weight plus a trainable low-rank update (Hu et al., 2021).

A frozen linear layer y = x W + b (W of shape (C_in, C_out), GPT-2's layout) is adapted by adding

    y = x W + b + s * (drop(x) A^T) B^T

with lora_A of shape (r, C_in) and lora_B of shape (C_out, r), PEFT's layout (so that A^T B^T is a
(C_in, C_out) matrix like W), a small rank r, and the scaling s = lora_alpha / r (or
lora_alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023). The update A^T B^T has rank at most r and
only r (C_in + C_out) numbers instead of C_in C_out. B starts at zero, so training starts exactly
at the base model.

Backward. Write h = drop(x) A^T, shape (..., r), and delta = s h B^T. Given dout = dL/dy:

    dB = s dout^T h                  (C_out, N) @ (N, r)    -> (C_out, r)
    dh = s dout B                    (..., C_out) @ (C_out, r) -> (..., r)
    dA = dh^T drop(x)                (r, N) @ (N, C_in)     -> (r, C_in)
    dx = dout W^T + drop'(dh A)      the base path plus the adapter path

where drop' multiplies by the same dropout mask. The frozen W still carries gradient to x (first
term of dx), but dW = x^T dout, a (C_in, N) @ (N, C_out) product, is never formed. At B = 0, dh = 0
and hence dA = 0: on the first step only B moves.

Merging folds the update into the weight, W' = W + s A^T B^T, for inference with no extra cost.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp, matmul
from ..layers import LinearCache, linear_backward, linear_forward


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA (which keeps updates stable as r grows)."""
    return lora_alpha / (r**0.5 if use_rslora else r)


class LoraCache(NamedTuple):
    x_in: object  # (..., C_in) the input of A, after dropout
    h: object  # (..., r) x_in @ A^T, the low-rank activation
    lora_A: object  # (r, C_in)
    lora_B: object  # (C_out, r)
    scaling: float
    dropout_mask: object  # (..., C_in) or None


def lora_forward(x, lora_A, lora_B, scaling: float, dropout_mask=None):
    """The adapter's contribution delta = s * (drop(x) A^T) B^T.   x: (..., C_in) -> (..., C_out)."""
    # BEGIN SOLUTION a5: delta = s * (drop(x) A^T) B^T; keep h = drop(x) A^T
    x_in = x if dropout_mask is None else x * dropout_mask
    h = matmul(x_in, lora_A.T)  # (..., r)
    delta = matmul(h, lora_B.T)  # (..., C_out)
    delta *= scaling
    # END SOLUTION
    return delta, LoraCache(x_in, h, lora_A, lora_B, scaling, dropout_mask)


def lora_backward(ddelta, cache: LoraCache):
    """Gradients of delta = s * (drop(x) A^T) B^T.   Returns (dx, dA, dB); see the module docstring."""
    x_in, h, lora_A, lora_B, scaling, mask = cache
    r, C_in = lora_A.shape
    C_out = lora_B.shape[0]
    # BEGIN SOLUTION a5: dB = s ddelta^T h; dh = s ddelta B; dA = dh^T x_in; dx = dh A
    ddelta_rows = ddelta.reshape(-1, C_out)  # (N, C_out)
    dB = matmul(ddelta_rows.T, h.reshape(-1, r))  # (C_out, r)
    dB *= scaling
    dh = matmul(ddelta, lora_B)  # (..., r)
    dh *= scaling
    dA = matmul(dh.reshape(-1, r).T, x_in.reshape(-1, C_in))  # (r, C_in)
    dx = matmul(dh, lora_A)  # (..., C_in)
    if mask is not None:
        dx *= mask  # the forward was x_in = x * mask
    # END SOLUTION
    return dx, dA, dB


class LoraLinearCache(NamedTuple):
    base: LinearCache
    lora: LoraCache


def lora_linear_forward(x, W, b, lora_A, lora_B, scaling: float, dropout_mask=None):
    """y = x W + b + s * (drop(x) A^T) B^T.   x: (..., C_in) -> y: (..., C_out)."""
    y, base = linear_forward(x, W, b)
    delta, lora = lora_forward(x, lora_A, lora_B, scaling, dropout_mask)
    y += delta
    return y, LoraLinearCache(base, lora)


def lora_linear_backward(dout, cache: LoraLinearCache, compute_dW: bool = False, compute_db: bool = True):
    """Returns (dx, dW, db, dA, dB). dW is None unless asked for: W is frozen, its product is skipped.

    x feeds both the base path and the adapter path, so dx is the sum of the two.
    """
    dx, dW, db = linear_backward(dout, cache.base, compute_dW=compute_dW, compute_db=compute_db)
    dx_lora, dA, dB = lora_backward(dout, cache.lora)
    dx += dx_lora
    return dx, dW, db, dA, dB


def lora_delta_weight(lora_A, lora_B, scaling: float):
    """The update as a full matrix, s A^T B^T, shape (C_in, C_out) like W."""
    # BEGIN SOLUTION a5: the update as a (C_in, C_out) matrix: s A^T B^T
    return scaling * matmul(lora_A.T, lora_B.T)
    # END SOLUTION


def require_finite(merged):
    """``merged`` itself if every value is finite; otherwise raise, before any weight is written."""
    if not bool(get_xp(merged).isfinite(merged).all()):
        raise FloatingPointError("merging would write NaN or infinite values into the weight; nothing was changed")
    return merged


def merge_weight(W, lora_A, lora_B, scaling: float):
    """W + s A^T B^T as a new array (W is not modified); raises if the result is not finite."""
    return require_finite(W + lora_delta_weight(lora_A, lora_B, scaling).astype(W.dtype))
