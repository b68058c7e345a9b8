"""Fused CuPy kernels: the same math as minilora.layers, fewer trips to memory.

The readable layers compute with whole-array operations. On a GPU each of those is a kernel launch
that reads its inputs from device memory and writes a fresh temporary back: LayerNorm's forward
makes about ten such passes, and the attention backward copies two (B, H, T, T) transposes. The
kernels here do the same arithmetic with one pass per data dependency:

    add              the residual add and the bias add, 16 bytes a thread
    gelu             forward and backward, one elementwise kernel each; the cache drops tanh(u)
    layernorm        one warp (short rows) or block per row, two-pass mean and variance; dw and db
                     by column partial sums
    cross_entropy    softmax, probabilities and per-row loss in one block per row; the backward in one kernel
    attention        the flash kernels (flash_attention.cu) for float32 and bf16; else cuBLAS batched
                     matmuls around fused causal-softmax kernels
    llama            RMSNorm (a warp per row) and SwiGLU (one kernel each way)
    rope             the rotary embedding's rotation, one kernel each way, reading strided heads
    gqa_attention    grouped-query attention: the flash kernels over repeated key/value heads, or cuBLAS
    adamw            one launch updates every parameter, through a table of device pointers
    grad_norm        the global gradient norm in two launches, no host sync

The layer pairs reach a model through ``minilora.fast.cuda.ops.CUDA_OPS``, the optimiser and norm
kernels through ``minilora.fast.cuda.optim``. Importing this package never imports CuPy: a kernel is
compiled on its first call and cached (by CuPy, also on disk).
"""
