"""Training, as reference code: the loop and its evaluation.

- ``loop``: ``train_step`` (forward, backward, clip, optimiser step) and ``train_loop``, which takes
  any step with the same signature (``step=``); the reference step is the default.
- ``evaluate``: validation bits per byte.

The jobs that choose a fast step and save results live above, in ``minilora.jobs``.
"""
