"""A LoRA fine-tuning loss curve on the fast GPU path: the run the mixed-precision tests compare.

Used by test_cuda_mixed_precision.py (a GPT) and test_cuda_llama.py (a Llama): the same model is
trained twice, its base in float32 and in bf16, and the two curves are held to a stated tolerance.
"""

import numpy as np

from minilora.backend import host_rng
from minilora.fast import accelerate
from minilora.jobs.finetune import make_optimizer
from minilora.training.loop import TrainSettings

LR = 3e-3
WINDOW, ROWS = 64, 8  # each step: 8 windows of 64 tokens


def fast_lora_losses(model, steps: int, alphabet: int, data_seed: int) -> np.ndarray:
    """Losses of ``steps`` graphed LoRA steps (AdamW at LR, clipping at 1) on a random text.

    The text is 4096 symbols drawn from ``alphabet`` of them: a small alphabet leaves something to
    learn quickly. The windows of step i are drawn from their own seeded stream.
    """
    optimizer = make_optimizer(model, TrainSettings(lr=LR, weight_decay=0.0))
    step = accelerate(model, optimizer, grad_clip=1.0, graph_warmup=1)
    data = host_rng(data_seed).integers(0, alphabet, 4096)
    losses = []
    for i in range(steps):
        starts = host_rng(7, i).integers(0, data.size - WINDOW - 1, ROWS)
        x = np.stack([data[s : s + WINDOW] for s in starts])
        y = np.stack([data[s + 1 : s + WINDOW + 1] for s in starts])
        losses.append(float(step(model, optimizer, x, y, LR, 1.0, (0, 0, i))))
    return np.array(losses)
