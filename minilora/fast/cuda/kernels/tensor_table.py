"""A table on the device that lists many tensors, so that one kernel launch can walk them all.

An optimiser step touches every trainable tensor: launching a kernel per tensor and per operation
costs, for a GPT-2 with ~150 tensors, over a thousand launches. Instead a kernel gets a table:

    pointers      (n_lists, n_tensors) uint64   the address of tensor t of list l (params, grads, ...)
    sizes         (n_tensors,) int64            its number of elements
    chunk_tensor  (n_chunks,) int64             the tensor that thread block b works on
    chunk_start   (n_chunks,) int64             where in that tensor block b's chunk begins

Each tensor is cut into chunks of CHUNK elements and each chunk gets one thread block, so a block
reads its tensor's pointers once and then streams through contiguous memory; the grid is the total
element count over CHUNK, rounded up per tensor.

Building a table is host work plus a small copy, so tables are cached by the addresses and sizes they
hold: the same arrays (an optimiser's parameters and moments, step after step) reuse their table,
and arrays that moved (fresh gradients from a different block of the memory pool) get a new one.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

CHUNK = 4096  # elements per thread block
CHUNK_THREADS = 256  # threads per block: 16 elements each


class TensorTable(NamedTuple):
    pointers: object  # (n_lists, n_tensors) uint64 device array
    sizes: object  # (n_tensors,) int64
    chunk_tensor: object  # (n_chunks,) int64
    chunk_start: object  # (n_chunks,) int64
    n_tensors: int
    n_chunks: int


def tensor_table(*lists) -> TensorTable:
    """The table of equally long lists of contiguous CuPy arrays of one dtype; entry t of each list
    must have as many elements as entry t of the first."""
    first = lists[0]
    for arrays in lists:
        if len(arrays) != len(first):
            raise ValueError(f"lists of {len(first)} and {len(arrays)} tensors")
        for t, array in enumerate(arrays):
            if not array.flags.c_contiguous or array.dtype != first[0].dtype or array.size != first[t].size:
                raise ValueError(
                    f"tensor {t}: need C-contiguous {first[0].dtype} arrays of {first[t].size} "
                    f"elements, got {array.dtype} {tuple(array.shape)} (contiguous: "
                    f"{array.flags.c_contiguous})"
                )
    pointers = tuple(tuple(array.data.ptr for array in arrays) for arrays in lists)
    return _build(pointers, tuple(int(array.size) for array in first))


@functools.lru_cache(maxsize=16)
def _build(pointers: tuple, sizes: tuple) -> TensorTable:
    import cupy

    counts = np.array([-(-size // CHUNK) for size in sizes], dtype=np.int64)  # chunks per tensor
    first_chunk = np.cumsum(counts) - counts  # the index of each tensor's first chunk
    chunk_tensor = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)  # (n_chunks,)
    chunk_start = (np.arange(len(chunk_tensor), dtype=np.int64) - first_chunk[chunk_tensor]) * CHUNK
    return TensorTable(
        pointers=cupy.asarray(np.array(pointers, dtype=np.uint64).reshape(len(pointers), len(sizes))),
        sizes=cupy.asarray(np.array(sizes, dtype=np.int64)),
        chunk_tensor=cupy.asarray(chunk_tensor),
        chunk_start=cupy.asarray(chunk_start),
        n_tensors=len(sizes),
        n_chunks=len(chunk_tensor),
    )
