"""Data parallelism across processes: ``mpirun -n N minilora pretrain|finetune ...``.

Every rank draws the same global batch, runs the first half of the step (training/step.py) on its
own rows, and the trainable gradients are summed across ranks, so that every rank makes the same
update. A one-process run never imports MPI. docs/distributed.md shows how to run it and what it
measured.

Reading order:

    world.py      which rank this process is, out of how many, read from the launcher's variables
    agreement.py  every rank's run compared with one allgather before the first step: the same run, or none
    mpi_step.py   the CPU step: each rank a shard of the batch, the gradients summed in rank order over MPI
    nccl_step.py  the GPU step: an NCCL all-reduce of the flat gradients inside the CUDA-graph step
    launch.py     the data-parallel step for the model's device (``fast.accelerate`` calls it)
    traffic.py    the bytes a step sends, counted from the configs alone: LoRA against a full fine-tune
"""
