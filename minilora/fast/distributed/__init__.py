"""Data parallelism across processes: ``mpirun -n N minilora pretrain|finetune ...``.

``world`` says which rank this process is; ``mpi_step`` is the CPU step (each rank a shard of the
batch, the gradients gathered and summed in rank order over MPI); ``nccl_step`` the GPU one (an NCCL
all-reduce inside the CUDA graph); ``traffic`` counts the bytes a step sends, LoRA against a full
fine-tune. docs/distributed.md shows how to run it and what it measured.
"""
