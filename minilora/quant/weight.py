"""A frozen matrix held as quantized blocks, dequantized a slab of rows at a time.

The matrix is stored the way GGUF and the QLoRA paper store weights: ``rows`` rows of ``cols``
values, each row cut into blocks along cols, each block a few constants and small integers (the
formats are in gguf_blocks.py and nf4.py). ``dequantize(r0, r1)`` gives rows r0..r1-1 as float32,
so no more than a slab of the full matrix ever exists in float32.

Two layouts say how the model reads the stored matrix:
- ``"linear"``: a projection stored (C_out, C_in), one row per output feature, as nn.Linear and
  GGUF store it. The model's logical weight is its transpose, minilora's (C_in, C_out), and
  ``shape`` reports that; y = x W = x stored^T.
- ``"table"``: an embedding stored (V, C), one row per token, as the model reads it; the tied
  output head multiplies by its transpose, logits = x stored^T, the same product as a linear.

``np.asarray(weight)`` dequantizes the whole logical matrix (what a fingerprint or a merge needs),
so a quantized base has the fingerprint of the float32 model holding the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..backend import get_xp

LAYOUTS = ("linear", "table")
SLAB_VALUES = 1 << 20  # dequantize at most this many values at once (4 MB in float32)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    format: str  # "q4_1", "q8_0" or "nf4"
    rows: int
    cols: int
    layout: str  # see the module docstring
    arrays: dict  # the format's arrays
    dequantize_rows: Callable  # (arrays, row indices (n,), cols) -> float32 (n, cols)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def shape(self) -> tuple[int, int]:
        """The model's logical shape: (C_in, C_out) for a linear, (V, C) for a table."""
        return (self.cols, self.rows) if self.layout == "linear" else (self.rows, self.cols)

    @property
    def size(self) -> int:
        return self.rows * self.cols

    ndim = 2
    dtype = np.dtype(np.float32)  # what it dequantizes to

    @property
    def nbytes(self) -> int:
        """The bytes it is held in: the blocks, not the float32 matrix."""
        return sum(int(a.nbytes) for a in self.arrays.values())

    @property
    def xp(self):
        return get_xp(next(iter(self.arrays.values())))

    def dequantize(self, r0: int = 0, r1: int | None = None):
        """Stored rows r0..r1-1 as float32, (r1 - r0, cols)."""
        r1 = self.rows if r1 is None else r1
        return self.dequantize_rows(self.arrays, self.xp.arange(r0, r1), self.cols)

    def take_rows(self, ids):
        """The stored rows at ``ids`` (any integer array) as float32, ids.shape + (cols,): a table lookup."""
        values = self.dequantize_rows(self.arrays, ids.reshape(-1), self.cols)
        return values.reshape(*ids.shape, self.cols)

    def slabs(self):
        """(r0, r1) ranges of whole rows, each at most SLAB_VALUES values (at least one row)."""
        step = max(1, SLAB_VALUES // self.cols)
        return [(r0, min(r0 + step, self.rows)) for r0 in range(0, self.rows, step)]

    def dense(self):
        """The model's logical matrix, dequantized whole on the weight's device: float32 ``shape``."""
        stored = self.dequantize()
        return stored.T if self.layout == "linear" else stored

    def transposed(self) -> QuantizedWeight:
        """The same blocks read as the transpose: a table as the (C, V) head it ties to, and back."""
        flipped = "table" if self.layout == "linear" else "linear"
        return QuantizedWeight(self.format, self.rows, self.cols, flipped, self.arrays, self.dequantize_rows)

    def map_arrays(self, function) -> QuantizedWeight:
        """The same weight with ``function`` applied to each array (to move it to a device, say)."""
        return QuantizedWeight(self.format, self.rows, self.cols, self.layout,
                               {k: function(a) for k, a in self.arrays.items()}, self.dequantize_rows)  # fmt: skip

    def __array__(self, dtype=None, copy=None):
        stored = self.dequantize()
        if get_xp(stored) is not np:
            stored = stored.get()
        logical = stored.T if self.layout == "linear" else stored
        return np.ascontiguousarray(logical, dtype=dtype)
