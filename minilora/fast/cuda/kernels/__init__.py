"""Fused CuPy kernels: the same math as minilora.layers, fewer trips to memory.

The readable layers compute with whole-array operations. On a GPU each of those is a kernel launch
that reads its inputs from device memory and writes a fresh temporary back: LayerNorm's forward
makes about ten such passes, and the attention backward copies two (B, H, T, T) transposes. The
kernels here do the same arithmetic with one pass per data dependency. The layer pairs reach a
model through ``minilora.fast.cuda.ops.CUDA_OPS``, the optimiser and norm kernels through
``minilora.fast.cuda.optim``. Importing this package never imports CuPy: a kernel is compiled on
its first call and cached (by CuPy, also on disk).

Reading order:

    blocks.py             what the row kernels share: block-wide reductions, compilation on first use,
                          the launch rule
    add.py                the residual add and the bias add, 16 bytes a thread
    gelu.py               forward and backward, one elementwise kernel each; the cache drops tanh(u)
    layernorm.py          one warp (short rows) or block per row, two-pass mean and variance; dw and db
                          by column partial sums
    cross_entropy.py      softmax, probabilities and per-row loss in one block per row; the backward in
                          one kernel
    attention_softmax.py  causal softmax and its backward, in place on the (B, H, T, T) scores
    attention.py          causal attention: the flash kernels for float32 and bf16, else cuBLAS batched
                          matmuls around the softmax kernels
    flash_attention.py    the flash kernels, one forward and two backward, never a (T, T) array; their
                          CUDA source is flash_attention.cu beside it
    llama.py              RMSNorm (a warp per row) and SwiGLU (one kernel each way)
    rope.py               the rotary embedding's rotation, one kernel each way, reading strided heads
    gqa_attention.py      grouped-query attention: the flash kernels over repeated key/value heads, or cuBLAS
    tensor_table.py       a device table of many tensors, so that one launch can walk them all
    adamw.py              one launch updates every parameter, through a tensor table
    grad_norm.py          the global gradient norm in two launches, no host sync
    dequantize.py         Q4_1, Q8_0 and NF4 blocks to float32, one kernel per slab
    decode.py             one generation step: the embedding, attention over the key/value cache, sampling
"""
