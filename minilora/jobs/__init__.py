"""The jobs behind the commands: they wire the reference and the fast path together.

They sit above the reference: they build the model and the optimiser, hand ``train_loop`` the fast
step for the device (``minilora.fast.accelerate``) and save the results. The reference imports none
of them.

Reading order:

    pretrain.py  a base model from scratch, with checkpoints and exact resume (``minilora pretrain``)
    finetune.py  LoRA or full fine-tuning of a base (``minilora finetune``), and ``fit``, the Python
                 API's training call
    resume.py    what both do first: the run's folder claimed, the state resumed, what resuming checks
    memory_check.py  sizes that cannot fit in memory, refused before anything is allocated
"""
