"""The linear layer on the GPU: the reference's product, with the bias added by one vectorised kernel.

``minilora.layers.linear`` adds the bias with ``out += b``, one CuPy kernel that indexes the
broadcast bias element by element; here the same sum is ``kernels/add.py``'s vectorised kernel. The
backward is the reference's (dx and dW are cuBLAS products, db a column sum).
"""

from __future__ import annotations

from ...backend import matmul
from ...layers import LinearCache
from .kernels.add import add_bias_


def linear_forward(x, W, b=None):
    """y = x @ W + b.   x: (..., C_in), W: (C_in, C_out), b: (C_out,) or None -> y: (..., C_out)."""
    out = matmul(x, W)  # (..., C_out), a new C-contiguous array
    if b is not None:
        add_bias_(out, b)
    return out, LinearCache(x=x, W=W, has_bias=b is not None)
