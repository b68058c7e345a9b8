"""The CPU fast path: the reference's formulas in fewer passes over memory, and the batch split across cores.

On the CPU a step is bound by trips to memory as much as by arithmetic, and NumPy's element-wise
work runs on one core. ``ops.CPU_OPS`` is the layer namespace rewritten as in-place passes over
reused buffers; ``sharded_step.sharded_train_step`` replaces the first half of the step with the
batch's shards run in threads, each with a one-threaded BLAS, their gradients summed. Each is
checked against the reference it replaces (tests/test_fast_cpu_ops.py).

Reading order:

    ops.py           CPU_OPS: GELU, LayerNorm, attention and cross-entropy as in-place passes
    llama_ops.py     the Llama family's SwiGLU, RMSNorm and grouped-query attention, the same way
    sharded_step.py  the training step with the batch split across the cores, the gradients summed
    host_memory.py   glibc told to keep freed memory, so that a step does not page-fault every time
    inference.py     eval and generate under the training step's policy: CPU_OPS, one-threaded BLAS
"""
