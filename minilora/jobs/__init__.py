"""The jobs behind the commands: they wire the reference and the fast path together.

- ``pretrain``: a base model from scratch, with checkpoints and exact resume (``minilora pretrain``);
- ``finetune``: LoRA or full fine-tuning of a checkpoint, and ``fit``, the Python API's training call
  (``minilora finetune``).

Both sit above the reference: they build the model and the optimiser, hand ``train_loop`` the fast
step for the device (``minilora.fast.accelerate``) and save the results.
"""
