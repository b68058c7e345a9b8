"""The residual connection's sum, x + branch: the add that closes each branch of a block.

Its backward needs no function of its own: the gradient of a sum reaches both addends unchanged,
and the model's backward adds the two paths where they meet again (derivation a4 in model.py). It is
a named layer function all the same, so that a fast path can replace the sum (on a GPU, one
vectorised kernel: bf16 arrays gain the most).
"""

from __future__ import annotations


def residual_add(x, branch):
    """x + branch, elementwise.   x, branch: (B, T, C) -> (B, T, C), a new array."""
    return x + branch
