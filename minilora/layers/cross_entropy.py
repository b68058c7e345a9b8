"""Softmax and cross-entropy fused into one layer: loss = mean over positions of -log p[target].

Fusing the two gives the famously simple gradient dlogits = (softmax(logits) - onehot(target)) / N
and avoids taking the log of a probability that underflowed to zero.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp
from ..fast.cuda.kernels import use_fused


class CrossEntropyCache(NamedTuple):
    probs: object  # (N, V) softmax of the logits
    targets: object  # (N,) integer targets
    logits_shape: tuple  # (..., V) the shape to give dlogits


def cross_entropy_forward(logits, targets):
    """Mean cross-entropy in nats.   logits: (..., V), targets: (...) int -> loss: 0-d array.

    The loss stays a 0-d array on its device: turning it into a Python float forces a GPU sync,
    so callers do that only when they log.
    """
    if use_fused(logits):  # on a GPU: softmax, probabilities and loss in one block per row
        from ..fast.cuda.kernels.cross_entropy import cross_entropy_forward as fused_cross_entropy_forward

        return fused_cross_entropy_forward(logits, targets)
    xp = get_xp(logits)
    logits_shape = logits.shape
    V = logits_shape[-1]
    logits = logits.reshape(-1, V)  # (N, V)
    targets = targets.reshape(-1)  # (N,)
    # BEGIN SOLUTION a1: shift rows by their max; loss = mean(log sum exp - target logit)
    shifted = logits - logits.max(axis=-1, keepdims=True)  # (N, V), max 0 per row
    target_logit = xp.take_along_axis(shifted, targets[:, None], axis=-1)  # (N, 1)
    probs = xp.exp(shifted, out=shifted)  # (N, V), unnormalised for now
    sum_exp = probs.sum(axis=-1, keepdims=True)  # (N, 1)
    loss = (xp.log(sum_exp) - target_logit).mean()  # -log softmax[target], averaged
    probs /= sum_exp
    # END SOLUTION
    return loss, CrossEntropyCache(probs=probs, targets=targets, logits_shape=logits_shape)


def cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """dlogits = dloss * (probs - onehot(targets)) / N, in the logits' shape (..., V)."""
    if use_fused(cache.probs):
        from ..fast.cuda.kernels.cross_entropy import cross_entropy_backward as fused_cross_entropy_backward

        return fused_cross_entropy_backward(dloss, cache)
    xp = get_xp(cache.probs)
    N = cache.probs.shape[0]
    # BEGIN SOLUTION a1: dlogits = (probs - onehot(targets)) * dloss / N
    dlogits = cache.probs.copy()  # (N, V)
    dlogits[xp.arange(N), cache.targets] -= 1.0
    dlogits *= dloss / N
    # END SOLUTION
    return dlogits.reshape(cache.logits_shape)
