"""The linear (affine) layer, GPT-2's ``Conv1D``: y = x @ W + b.

W has shape (C_in, C_out), the layout of the Hugging Face GPT-2 state dict (the transpose of
``torch.nn.Linear``'s). Inputs may carry any number of leading axes, e.g. (B, T, C_in); the
matmuls flatten them into one axis of N = B*T rows so that BLAS sees one large product.

The backward can skip dW. That is LoRA's saving: a frozen weight still passes the gradient on to its
input, but its own gradient, a matrix product as costly as the forward's, is never formed.

Derivation (a1):
    dx needs W and dW needs x, which is why the cache keeps both: dW = x^T @ dout is the extra
    (C_in x N) @ (N x C_out) product that a frozen weight skips.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import matmul


class LinearCache(NamedTuple):
    x: object  # (..., C_in) the input, needed for dW
    W: object  # (C_in, C_out) the weight, needed for dx
    has_bias: bool


def linear_forward(x, W, b=None):
    """y = x @ W + b.   x: (..., C_in), W: (C_in, C_out), b: (C_out,) or None -> y: (..., C_out)."""
    # BEGIN SOLUTION a1: out = x @ W, plus b when b is given
    out = matmul(x, W)  # (..., C_out)
    if b is not None:
        out += b
    # END SOLUTION
    return out, LinearCache(x=x, W=W, has_bias=b is not None)


def linear_backward(dout, cache: LinearCache, compute_dW: bool = True, compute_db: bool = True):
    """Gradients of y = x @ W + b.   dout: (..., C_out) -> dx (..., C_in), dW (C_in, C_out), db (C_out,).

    Returns (dx, dW, db); dW is None when ``compute_dW`` is False (a frozen weight) and db is None
    when the layer has no bias or ``compute_db`` is False (a frozen bias: its gradient is skipped too).

    Derivation (a1):
        dx = dout @ W^T                      (..., C_out) @ (C_out, C_in) -> (..., C_in)
        dW = x^T @ dout, summed over rows    (C_in, N) @ (N, C_out) -> (C_in, C_out)
        db = dout summed over rows           (C_out,)
    """
    x, W = cache.x, cache.W
    C_in, C_out = W.shape
    # BEGIN SOLUTION a1: dx, dW (rows: leading axes flattened), db
    dx = matmul(dout, W.T)  # (..., C_in)
    dout_rows = dout.reshape(-1, C_out)  # (N, C_out)
    dW = matmul(x.reshape(-1, C_in).T, dout_rows) if compute_dW else None  # (C_in, C_out)
    db = dout_rows.sum(axis=0) if cache.has_bias and compute_db else None  # (C_out,)
    # END SOLUTION
    return dx, dW, db
