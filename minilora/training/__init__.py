"""Training, as reference code: batches, one optimiser step, the loop and its evaluation.
A corpus hands the loop its batches (``train_batch``): windows of a text, or examples.

A step has two halves: ``forward_backward``, a batch's loss and gradients, and ``apply_update``,
clipping and the optimiser. A ``TrainingStep`` holds the two and accumulates gradients over
micro-batches; ``train_loop(..., step=...)`` runs any such step, which is the seam where a fast
path replaces one half at a time, from above (``minilora.fast``). The jobs that choose a fast step
and save results live above too, in ``minilora.jobs``.

Reading order:

    batches.py   get_batch: B windows of T tokens at random offsets, and their targets one token later
    examples.py  whole examples with the tokens the loss scores marked, padded one per row or packed
    step.py      forward_backward, apply_update, train_step, and TrainingStep with gradient accumulation
    loop.py      train_loop and TrainSettings: a step per batch, evaluation, checkpoints, exact resume
    evaluate.py  validation bits per byte, for the byte-level tokenizer and for subword ones
"""
