"""Softmax and cross-entropy fused into one layer: loss = mean over positions of -log p[target].

Fusing the two gives a famously simple gradient and avoids taking the log of a probability that
underflowed to zero.

Derivation (a1):
    dlogits = (softmax(logits) - onehot(target)) / N
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp


class CrossEntropyCache(NamedTuple):
    probs: object  # (N, V) softmax of the logits
    targets: object  # (N,) integer targets
    logits_shape: tuple  # (..., V) the shape to give dlogits


def cross_entropy_forward(logits, targets):
    """Mean cross-entropy in nats.   logits: (..., V), targets: (...) int -> loss: 0-d array.

    The loss stays a 0-d array on its device: turning it into a Python float forces a GPU sync,
    so callers do that only when they log.
    """
    xp = get_xp(logits)
    logits_shape = logits.shape
    V = logits_shape[-1]
    logits = logits.reshape(-1, V)  # (N, V)
    targets = targets.reshape(-1)  # (N,)
    # BEGIN SOLUTION a1: shift rows by their max; loss = mean(log sum exp - target logit)
    shifted = logits - logits.max(axis=-1, keepdims=True)  # (N, V), max 0 per row: exp cannot overflow
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))  # (N, V) log softmax
    loss = -xp.take_along_axis(log_probs, targets[:, None], axis=-1).mean()  # mean of -log p[target]
    probs = xp.exp(log_probs)  # (N, V)
    # END SOLUTION
    return loss, CrossEntropyCache(probs=probs, targets=targets, logits_shape=logits_shape)


def cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """Gradient of the mean cross-entropy.   dloss: a number or 0-d array -> dlogits: (..., V).

    Derivation (a1):
        dlogits = dloss * (probs - onehot(targets)) / N, in the logits' shape (..., V).
    """
    xp = get_xp(cache.probs)
    N = cache.probs.shape[0]
    # BEGIN SOLUTION a1: dlogits (N, V) from the cached probs and targets, times dloss; mind the mean
    onehot = xp.zeros_like(cache.probs)  # (N, V)
    onehot[xp.arange(N), cache.targets] = 1.0
    dlogits = (cache.probs - onehot) * (dloss / N)
    # END SOLUTION
    return dlogits.reshape(cache.logits_shape)
