"""What the row kernels share: block-wide reductions in CUDA, compilation on first use, the launch rule.

A *row kernel* gives each row of a 2-D problem one thread block: a row of LayerNorm's input, a row
of logits, a row of attention scores. Thread t of the block takes the columns t, t + blockDim.x,
t + 2 blockDim.x, ...; consecutive threads read consecutive addresses, so the loads of each warp
(32 threads that execute together) coalesce into a few wide memory transactions. Per-row statistics
(a maximum, a sum) start as one partial result per thread and are combined by ``block_sum`` and
``block_max`` below, in a fixed order: the same input always gives the same bits.

Every kernel is written once as a C++ template over ``Elem``, the type of its arrays, and
instantiated for float, double and bfloat16. Its arithmetic is in ``Real = Compute<Elem>::type``: float32
accumulates in float32 and float64 in float64, like the readable layers they replace, and bfloat16
arrays are read into float32 and rounded back only where a result is stored (mixed precision: the
memory traffic of bf16, the sums of float32).
"""

from __future__ import annotations

import functools
import math

KERNEL_TYPES = {"float32": "float", "float64": "double", "bfloat16": "__nv_bfloat16"}  # dtype -> Elem
ITEM_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2}
MAX_THREADS = 512  # threads per row block (16 warps); longer rows loop
ROWS_PER_WARP_BLOCK = 8  # a warp-per-row kernel's block: 8 warps, 8 rows (``launch_warp_rows``)
ELEMENTWISE_THREADS, MAX_ELEMENTWISE_BLOCKS = 256, 8192  # an elementwise kernel's launch (grid-stride)
VECTOR_BYTES = 16  # a vectorised kernel's loads and stores (Pack<Elem, VEC> in REDUCTIONS)
NULL = 0  # a Python int reaches a kernel as a 64-bit integer: in a pointer parameter, the null pointer

REDUCTIONS = r"""
#include <cuda_bf16.h>

// The arithmetic type of a kernel over arrays of Elem: Elem itself, except float for bfloat16.
template <typename Elem> struct Compute { typedef Elem type; };
template <> struct Compute<__nv_bfloat16> { typedef float type; };

// Elementwise kernels visit i = first, first + stride, ... (a grid-stride loop): any n, any grid.
#define FOR_EACH_ELEMENT(i, n)                                                   \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

// VEC consecutive elements moved as one load or store: 16 bytes (8 bf16, 4 float, 2 double), or
// one element when VEC = 1. A vectorised kernel visits pack p = elements VEC p .. VEC p + VEC - 1.
template <typename Elem, int VEC>
struct alignas(sizeof(Elem) * VEC) Pack { Elem v[VEC]; };

// Every row kernel runs with blockDim.x a whole number of warps (a multiple of 32, at most 1024).

// Sum over the 32 lanes of a warp by butterfly exchanges: lane L adds the value of lane L ^ 16, then
// of L ^ 8, 4, 2, 1. Addition is commutative, so after the five steps every lane holds the very
// same total. Registers only: no shared memory, no barrier.
template <typename Real>
__device__ __forceinline__ Real warp_sum(Real v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

template <typename Real>
__device__ __forceinline__ Real warp_max(Real v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const Real other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = other > v ? other : v;
    }
    return v;
}

// Sum over the whole block, returned to every thread. 1: each warp reduces its 32 values.
// 2: lane 0 of each warp parks the warp's total in scratch (32 slots: at most 32 warps).
// 3: every warp reads the parked totals and reduces them again, so every thread gets the total.
// The last barrier lets the caller reuse scratch for its next reduction at once.
template <typename Real>
__device__ Real block_sum(Real v, Real* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : Real(0);
    v = warp_sum(v);
    __syncthreads();
    return v;
}

// Maximum over the whole block, the same way; lanes past the last warp repeat warp 0's maximum.
template <typename Real>
__device__ Real block_max(Real v, Real* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = warp_max(scratch[lane < n_warps ? lane : 0]);
    __syncthreads();
    return v;
}
"""


def c_type(dtype) -> str:
    """The C++ type that a kernel uses for arrays of ``dtype``: float, double or __nv_bfloat16."""
    name = getattr(dtype, "name", str(dtype))
    if name not in KERNEL_TYPES:
        raise TypeError(f"the fused kernels take float32, float64 or bfloat16 arrays, got {name}")
    return KERNEL_TYPES[name]


def vector_width(dtype) -> int:
    """Elements of ``dtype`` (or of the dtype so named) in one 16-byte vector: a vectorised kernel's VEC."""
    return VECTOR_BYTES // ITEM_BYTES[getattr(dtype, "name", str(dtype))]


def vectorisable(n: int, *arrays) -> bool:
    """Whether 16-byte vectors fit: n a multiple of the vector's width, every array 16-byte aligned."""
    return n % vector_width(arrays[0].dtype) == 0 and all(a.data.ptr % VECTOR_BYTES == 0 for a in arrays)


def compute_dtype(dtype):
    """The dtype of a kernel's arithmetic (and of its per-row statistics) for arrays of ``dtype``."""
    import numpy as np

    return np.dtype(np.float32) if np.dtype(dtype).name == "bfloat16" else np.dtype(dtype)


def compile_options() -> tuple[str, ...]:
    """NVRTC options for minilora's kernels: C++17, and the CUDA headers' folder for cuda_bf16.h."""
    from pathlib import Path

    import cupy

    options = ("--std=c++17",)
    cuda_path = cupy.cuda.get_cuda_path()
    if cuda_path is not None and Path(cuda_path, "include").is_dir():
        options += (f"-I{Path(cuda_path, 'include')}",)
    return options


class KernelModule:
    """CUDA source (after REDUCTIONS) whose templated kernels are compiled on first use, per type.

    Creating one imports nothing; ``get`` compiles the module once (CuPy also caches the binary on
    disk) and returns the kernel instantiated for the dtype, e.g. ``get("layernorm_forward", x.dtype)``.
    With ``vectorised``, every kernel is a template over <Elem, VEC> too, instantiated for VEC =
    ``vector_width(dtype)`` and VEC = 1; ``get(..., vectorised=True)`` picks the first.
    """

    def __init__(
        self,
        source: str,
        kernels: tuple[str, ...],
        dtypes: tuple[str, ...] = ("float32", "float64"),
        vectorised: bool = False,
    ):
        self.source = REDUCTIONS + source
        self.kernels = kernels
        self.dtypes = dtypes  # the array dtypes the kernels are instantiated for
        self.vectorised = vectorised

    def _name(self, kernel: str, dtype_name: str, vectorised: bool) -> str:
        if not self.vectorised:
            return f"{kernel}<{KERNEL_TYPES[dtype_name]}>"
        return f"{kernel}<{KERNEL_TYPES[dtype_name]}, {vector_width(dtype_name) if vectorised else 1}>"

    @functools.cached_property
    def _module(self):
        import cupy

        forms = (True, False) if self.vectorised else (False,)
        names = [self._name(k, name, form) for k in self.kernels for name in self.dtypes for form in forms]
        return cupy.RawModule(code=self.source, options=compile_options(), name_expressions=names)

    def get(self, kernel: str, dtype, vectorised: bool = False):
        name = getattr(dtype, "name", str(dtype))
        if name not in self.dtypes:
            raise TypeError(f"the kernel {kernel} takes {' or '.join(self.dtypes)} arrays, got {name}")
        return self._module.get_function(self._name(kernel, name, vectorised))


def row_threads(n_cols: int) -> int:
    """Threads for a row block: whole warps, one column per thread, up to MAX_THREADS."""
    return min(MAX_THREADS, 32 * max(1, math.ceil(n_cols / 32)))


def launch_elementwise(kernel, n: int, args: tuple) -> None:
    """Launch an elementwise ``kernel(..., n)`` over n elements: 256 threads a block, grid-stride loops."""
    if n > 0:
        kernel(
            (min(math.ceil(n / ELEMENTWISE_THREADS), MAX_ELEMENTWISE_BLOCKS),), (ELEMENTWISE_THREADS,), args
        )


def launch_warp_rows(kernel, n_rows: int, args: tuple) -> None:
    """Launch ``kernel`` with one warp per row, ROWS_PER_WARP_BLOCK rows a block (no launch for zero rows)."""
    if n_rows > 0:
        kernel((math.ceil(n_rows / ROWS_PER_WARP_BLOCK),), (32 * ROWS_PER_WARP_BLOCK,), args)


def head_strides(x, name: str):
    """(batch, head, time) strides of a (B, H, T, hs) view, in elements, as the int64 kernel arguments.

    The kernels that walk per-head views (flash attention, RoPE, the group sum) address element
    (b, h, t, d) at b sb + h sh + t st + d, so the head axis must be contiguous; raises ValueError if not.
    """
    import numpy as np

    item = x.dtype.itemsize
    sb, sh, st, sd = (s // item for s in x.strides)
    if sd != 1:
        raise ValueError(f"{name}: the head axis must be contiguous, got strides {x.strides}")
    return np.int64(sb), np.int64(sh), np.int64(st)


def launch_rows(kernel, n_rows: int, n_cols: int, args: tuple) -> None:
    """Launch ``kernel`` with one block per row. Zero rows launch nothing (CuPy would run one block)."""
    if n_rows > 0:
        kernel((n_rows,), (row_threads(n_cols),), args)
