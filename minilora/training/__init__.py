"""Training: the loop and its evaluation (reference code), and the two jobs behind the commands.

- ``loop``: ``train_step`` (forward, backward, clip, optimiser step) and ``train_loop``, which takes
  any step with the same signature (``step=``); the reference step is the default.
- ``evaluate``: validation bits per byte.
- ``pretrain`` and ``finetune``: the jobs of ``minilora pretrain`` and ``minilora finetune``. They sit
  above the reference and hand ``train_loop`` the fast step for the device (``minilora.fast``).
"""
