"""Matrix products on the GPU through cuBLAS, called with our own handle so that CUDA graphs can record them.

CuPy's ``matmul`` calls cuBLAS too, but CuPy refuses any cuBLAS call while a stream is being captured
into a CUDA graph (its ``setStream`` raises "currently unsupported"), and a training step is mostly matrix
products. cuBLAS itself supports capture when its handle has a workspace of its own (so it never
allocates during the capture). So this module loads the cuBLAS library CuPy already loaded, makes one
handle with a 32 MiB workspace, and calls ``cublas<S|D>gemmStridedBatched`` through ctypes.

Row-major products with a column-major library. NumPy and CuPy store matrices row by row; cuBLAS
reads them column by column. A row-major (r, c) matrix with row stride ld *is* a column-major (c, r)
matrix, its transpose, with leading dimension ld. So C = A B (row-major) is computed as
C^T = B^T A^T (column-major): swap the operands, and each row-major operand is passed as-is
("N": cuBLAS sees its transpose, which is what the swapped formula wants) or, when its columns are the
contiguous ones (a transposed view such as W.T), flagged "T". The output is written row-major, (m, n)
per batch. TF32 is off unless asked for: the handle keeps cuBLAS's default math, full float32
products; ``use_tf32(True)`` lets float32 products run on the tensor cores with 10-bit mantissas
(about 3e-4 relative error instead of 1e-7), an option for speed that is never the default.
"""

from __future__ import annotations

import ctypes
from functools import cache

OP_N, OP_T = 0, 1  # cublasOperation_t
DEFAULT_MATH, TF32_TENSOR_OP_MATH = 0, 3  # cublasMath_t
WORKSPACE_BYTES = 32 * 1024 * 1024  # NVIDIA's recommended cuBLAS workspace on Hopper
GEMM_SYMBOLS = {
    "float32": ("cublasSgemmStridedBatched", ctypes.c_float),
    "float64": ("cublasDgemmStridedBatched", ctypes.c_double),
}


GEMM_EX = "cublasGemmStridedBatchedEx"
CUDA_DATA_TYPES = {"float32": 0, "float64": 1, "bfloat16": 14}  # cudaDataType_t: CUDA_R_32F, _64F, _16BF
COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F: float32 products and sums
GEMM_DEFAULT = -1  # cublasGemmAlgo_t CUBLAS_GEMM_DEFAULT: cuBLAS's heuristic picks the kernel


class CublasError(RuntimeError):
    """A cuBLAS call returned an error status."""


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasError(f"{what} failed with cublasStatus_t {status}")


def _loaded_library_path() -> str:
    """The path of the libcublas CuPy has loaded in this process (so both use one and the same library)."""
    import cupy

    cupy.cuda.device.get_cublas_handle()  # makes CuPy load cuBLAS if it has not yet
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "/libcublas.so" in path:
                return path
    raise CublasError("cannot find the cuBLAS library CuPy loaded (looked in /proc/self/maps)")


@cache
def _blas():
    """(library, handle, workspace), made once, on the device current at the first call (one GPU)."""
    import cupy

    lib = ctypes.CDLL(_loaded_library_path())
    handle = ctypes.c_void_p()
    _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
    workspace = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)  # kept alive with the handle
    _check(
        lib.cublasSetWorkspace_v2(
            handle, ctypes.c_void_p(workspace.data.ptr), ctypes.c_size_t(WORKSPACE_BYTES)
        ),
        "cublasSetWorkspace",
    )
    for name, scalar in GEMM_SYMBOLS.values():
        getattr(lib, name).argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(scalar),
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_longlong,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_longlong,
            ctypes.POINTER(scalar),
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_longlong,
            ctypes.c_int,
        ]
    lib_ex = getattr(lib, GEMM_EX)
    lib_ex.argtypes = [
        ctypes.c_void_p,  # handle
        ctypes.c_int,  # transa
        ctypes.c_int,  # transb
        ctypes.c_int,  # m
        ctypes.c_int,  # n
        ctypes.c_int,  # k
        ctypes.c_void_p,  # alpha (a float for COMPUTE_32F)
        ctypes.c_void_p,  # A
        ctypes.c_int,  # Atype
        ctypes.c_int,  # lda
        ctypes.c_longlong,  # strideA
        ctypes.c_void_p,  # B
        ctypes.c_int,  # Btype
        ctypes.c_int,  # ldb
        ctypes.c_longlong,  # strideB
        ctypes.c_void_p,  # beta
        ctypes.c_void_p,  # C
        ctypes.c_int,  # Ctype
        ctypes.c_int,  # ldc
        ctypes.c_longlong,  # strideC
        ctypes.c_int,  # batchCount
        ctypes.c_int,  # computeType
        ctypes.c_int,  # algo
    ]
    return lib, handle, workspace


_tf32_enabled = False  # the math mode last set on the handle


def use_tf32(enabled: bool) -> None:
    """Let float32 products use TF32 tensor cores (True) or keep full float32 (False, the default)."""
    global _tf32_enabled
    lib, handle, _ = _blas()
    _check(
        lib.cublasSetMathMode(handle, TF32_TENSOR_OP_MATH if enabled else DEFAULT_MATH), "cublasSetMathMode"
    )
    _tf32_enabled = enabled


def tf32_enabled() -> bool:
    return _tf32_enabled


def _as_operand(x):
    """(array, op, ld) for a stack of row-major matrices (..., r, c): its layout as cuBLAS should read it.

    Rows contiguous (the usual case, also a view of some columns): "N" with ld = the row stride.
    Columns contiguous (a transposed view): "T" with ld = the column stride. Anything else is copied.
    """
    rows, cols = x.shape[-2:]
    s0, s1 = (s // x.itemsize for s in x.strides[-2:])
    if rows > 1 and cols > 1:
        if s1 == 1 and s0 >= cols:
            return x, OP_N, s0
        if s0 == 1 and s1 >= rows:
            return x, OP_T, s1
    import cupy

    return cupy.ascontiguousarray(x), OP_N, max(cols, 1)


def _batch_stride(x) -> int:
    """Elements between consecutive matrices of a (batch, r, c) stack (0 for a single matrix)."""
    return x.strides[0] // x.itemsize if x.ndim == 3 and x.shape[0] > 1 else 0


def supports(a, b) -> bool:
    """Whether ``matmul`` handles these operands (else ``product`` uses cupy.matmul)."""
    return (
        a.dtype == b.dtype
        and a.dtype.name in CUDA_DATA_TYPES
        and a.ndim >= 2
        and b.ndim >= 2
        and (b.ndim == 2 or a.shape[:-2] == b.shape[:-2])
        and a.shape[-1] == b.shape[-2]
        and a.size
        and b.size
    )


def matmul(a, b, out_dtype=None, alpha: float = 1.0, accumulate=None):
    """alpha (a @ b) for CuPy arrays: (..., m, k) @ (k, n) or (..., m, k) @ (..., k, n), equal batch shapes.

    The result has a's dtype, or ``out_dtype`` (float32 from bf16 operands: the products' float32 sums
    unrounded). With ``accumulate``, a C-contiguous (..., m, n) array, the product is added into it
    instead (cuBLAS's beta = 1: C = alpha a b + C, rounded once) and ``accumulate`` is returned.
    """
    import cupy

    (m, k), n = a.shape[-2:], b.shape[-1]
    batch_shape = a.shape[:-2]
    if b.ndim == 2:  # one weight for every row of every batch: a single (M, k) @ (k, n) product
        a3, b3 = a.reshape(1, -1, k), b.reshape(1, k, n)
        rows = a3.shape[1]
    else:
        a3, b3 = a.reshape(-1, m, k), b.reshape(-1, k, n)
        rows = m
    batch = a3.shape[0]
    if accumulate is None:
        out = cupy.empty((batch, rows, n), dtype=a.dtype if out_dtype is None else out_dtype)
        beta = 0.0
    else:
        if accumulate.shape != (*batch_shape, m, n) or not accumulate.flags.c_contiguous:
            raise ValueError(
                f"accumulate must be a C-contiguous {(*batch_shape, m, n)} array, got {accumulate.shape}"
            )
        out, beta = accumulate.reshape(batch, rows, n), 1.0
    a3, op_a, ld_a = _as_operand(a3)
    b3, op_b, ld_b = _as_operand(b3)
    lib, handle, _ = _blas()
    _check(
        lib.cublasSetStream_v2(handle, ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)), "cublasSetStream"
    )
    # column-major: out^T (n, rows) = op(b)^T-view (n, k) times op(a)^T-view (k, rows), batch by batch
    shape = (op_b, op_a, n, rows, k)
    b_arg = (ctypes.c_void_p(b3.data.ptr), ld_b, _batch_stride(b3))
    a_arg = (ctypes.c_void_p(a3.data.ptr), ld_a, _batch_stride(a3))
    out_arg = (ctypes.c_void_p(out.data.ptr), n, rows * n)
    if a.dtype.name in GEMM_SYMBOLS and out.dtype == a.dtype:
        name, scalar = GEMM_SYMBOLS[a.dtype.name]
        alpha_, beta_ = scalar(alpha), scalar(beta)
        args = (*shape, ctypes.byref(alpha_), *b_arg, *a_arg, ctypes.byref(beta_), *out_arg, batch)
    else:  # bf16 (or a float32 result of bf16 operands): the typed entry point, float32 sums
        name = GEMM_EX
        alpha_, beta_ = ctypes.c_float(alpha), ctypes.c_float(beta)
        ab_type, out_type = CUDA_DATA_TYPES[a.dtype.name], CUDA_DATA_TYPES[out.dtype.name]
        args = (
            *shape,
            ctypes.addressof(alpha_),
            b_arg[0], ab_type, *b_arg[1:],
            a_arg[0], ab_type, *a_arg[1:],
            ctypes.addressof(beta_),
            out_arg[0], out_type, *out_arg[1:],
            batch, COMPUTE_32F, GEMM_DEFAULT,
        )  # fmt: skip
    _check(getattr(lib, name)(handle, *args), name)
    return accumulate if accumulate is not None else out.reshape(*batch_shape, m, n)


def product(a, b):
    """a @ b for CuPy arrays: through our cuBLAS handle where ``matmul`` takes the operands, else cupy.matmul.

    This is the product ``minilora.fast.cuda.use_cublas`` registers with ``backend.register_matmul``.
    """
    if supports(a, b):
        return matmul(a, b)
    import cupy

    return cupy.matmul(a, b)
