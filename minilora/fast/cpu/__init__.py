"""The CPU fast path: in-place layer functions (``ops.CPU_OPS``), the batch split across cores
(``sharded_step.sharded_train_step``) and glibc told to keep freed memory (``host_memory``)."""
