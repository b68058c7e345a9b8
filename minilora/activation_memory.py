"""Trading compute for activation memory in a training step: what both model families share.

Two switches, both off by default (``LanguageModel.set_activation_memory`` turns them on):

- gradient checkpointing keeps of each block only its input (``BlockCheckpoint``) and runs the block
  again in the backward, so the activations of one block exist at a time instead of every block's.
  The price is one more forward of every block. The block run again must draw the same dropout
  masks, so the checkpoint keeps a copy of the dropout generator as the block found it.
- loss chunks take the output head and the cross-entropy ``loss_chunk_rows`` rows at a time, so the
  (B, T, V) logits and their probabilities never exist whole. The loss is the model's last function,
  so each chunk's gradient is made and sent back through the head while the chunk's probabilities
  exist. The head must be frozen: its weight gradient would need every chunk's dlogits.

What this module asks of a family: ``block_forward(i, x, *block_inputs, rng)`` returning (out,
cache), ``head_forward(rows)`` -> (logits, head cache), ``frozen_head_backward(dlogits, head)`` -> the
head input's gradient, and ``head_weight_name``, the parameter the head multiplies by.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

from .layers import IGNORE


class BlockCheckpoint(NamedTuple):
    """What gradient checkpointing keeps of a block instead of its activations (recomputed in backward)."""

    x: object  # (B, T, C) the block's input
    dropout_rng: object  # a copy of the dropout generator as the block found it (same masks again), or None

    def activations(self, model, i: int, *block_inputs):
        """Block i run again from its input with the same dropout masks: the cache its backward reads.

        ``block_inputs``: what the family's block_forward takes between x and the generator (the
        Llama's rotary tables; nothing for the GPT). The generator is copied again, so the
        checkpoint draws the same masks however often it is run.
        """
        return model.block_forward(i, self.x, *block_inputs, copy.deepcopy(self.dropout_rng))[1]


def checkpointed_block_forward(model, i: int, x, *block_inputs, dropout_rng):
    """Block i's output and its BlockCheckpoint: the block's own caches are let go as soon as it returns."""
    checkpoint = BlockCheckpoint(x, copy.deepcopy(dropout_rng))
    return model.block_forward(i, x, *block_inputs, dropout_rng)[0], checkpoint


class ChunkedHeadLoss(NamedTuple):
    """The head and the loss taken a chunk of rows at a time: only the input's gradient is kept."""

    dx: object  # (B, T, C) d(loss)/d(head's input) for dloss = 1; the (B, T, V) logits never exist

    def backward(self, model, dloss: float):
        """(dx, None): the head's input gradient was formed in the forward, and the head is frozen."""
        return self.dx * dloss, None


def check_frozen_head(model) -> None:
    """Loss chunks never make the head's weight gradient: refuse a trainable head, in one line."""
    if model.is_trainable(model.head_weight_name):
        raise ValueError(
            f"loss_chunk_rows needs a frozen output head, but {model.head_weight_name!r} is trainable: "
            "set loss_chunk_rows = None"
        )


def chunk_weight(chunk_scored, n_scored):
    """A chunk's share of the mean loss: its scored targets over all of them (layers/cross_entropy.py).

    chunk_scored: (n,) 1 where the chunk's target is scored, 0 where IGNORE; n_scored: the count over
    all N targets (at least 1), a 0-d array. With every target scored this is n / N. The share stays
    a device scalar: no sync, and a CUDA graph replays it.
    """
    return chunk_scored.sum() / n_scored


def chunked_head_loss(model, x, targets):
    """Mean cross-entropy of the head's logits, model.loss_chunk_rows rows at a time, and its dx.

    The mean is the chunks' losses weighted by ``chunk_weight``, and each chunk's dlogits, the
    cross-entropy's backward for that weight, goes through the frozen head at once.
    x: (B, T, C), targets: (B, T) -> (loss, ChunkedHeadLoss).
    """
    check_frozen_head(model)
    B, T, C = x.shape
    rows, flat_targets = x.reshape(B * T, C), targets.reshape(B * T)
    dx = model.xp.empty_like(rows)  # (N, C)
    loss = 0.0
    real = model.xp.float64 if x.dtype == model.xp.float64 else model.xp.float32  # bf16's loss is float32
    scored = (flat_targets != IGNORE).astype(real)  # (N,)
    n_scored = model.xp.maximum(scored.sum(), 1)
    for r0 in range(0, B * T, model.loss_chunk_rows):
        chunk = slice(r0, r0 + model.loss_chunk_rows)  # the last chunk may be shorter
        weight = chunk_weight(scored[chunk], n_scored)
        logits, head = model.head_forward(rows[chunk])  # (n, V)
        part, ce = model.ops.cross_entropy_forward(logits, flat_targets[chunk])
        del logits  # the probabilities in ce are all the chunk keeps
        loss = loss + weight * part
        dx[chunk] = model.frozen_head_backward(model.ops.cross_entropy_backward(weight, ce), head)
    return loss, ChunkedHeadLoss(dx=dx.reshape(B, T, C))
