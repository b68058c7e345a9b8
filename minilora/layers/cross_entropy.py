"""Softmax and cross-entropy fused into one layer: the mean over scored positions of -log p[target].

Fusing the two gives a famously simple gradient and avoids taking the log of a probability that
underflowed to zero.

Not every position is scored. In instruction tuning the model learns the assistant's answer, not the
user's question, the template's markers or the padding, so those positions carry the target IGNORE
(PyTorch's ``ignore_index``, Hugging Face's label for "no loss here"). With w_n = 1 where target t_n
is scored and 0 where it is IGNORE, the loss is a weighted mean:

    loss = sum_n w_n (-log p_n[t_n]) / sum_n w_n

Without IGNORE targets every w_n is 1 and this is the plain mean over all N positions.

Derivation (a1):
    dlogits_n = w_n (softmax(logits_n) - onehot(t_n)) / sum_m w_m
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp

IGNORE = -100  # the target of a position that is not scored (a prompt token, a pad)


class CrossEntropyCache(NamedTuple):
    probs: object  # (N, V) softmax of the logits
    targets: object  # (N,) integer targets, IGNORE replaced by 0 (its weight is 0)
    weights: object  # (N,) w_n / sum_m w_m: each position's share of the loss, 0 where not scored
    logits_shape: tuple  # (..., V) the shape to give dlogits


def scored_weights(targets, dtype):
    """(N,) targets -> (N,) w_n / sum_m w_m in ``dtype``, w_n = 1 where t_n is scored, 0 where IGNORE.

    With nothing scored every weight is 0 (the loss is 0, not 0/0). The sum stays a device array:
    turning it into a Python number would force a GPU sync.
    """
    xp = get_xp(targets)
    scored = (targets != IGNORE).astype(dtype)  # (N,) w_n
    return scored / xp.maximum(scored.sum(), 1)  # 1 is a weak scalar: the weights keep ``dtype``


def cross_entropy_forward(logits, targets):
    """Mean cross-entropy in nats over the scored targets.   logits: (..., V), targets: (...) int -> 0-d.

    A target equal to IGNORE is not scored. The loss stays a 0-d array on its device: turning it
    into a Python float forces a GPU sync, so callers do that only when they log.
    """
    xp = get_xp(logits)
    logits_shape = logits.shape
    V = logits_shape[-1]
    logits = logits.reshape(-1, V)  # (N, V)
    targets = targets.reshape(-1)  # (N,)
    # BEGIN SOLUTION a1: shift rows by their max; loss = weighted mean of (log sum exp - target logit)
    weights = scored_weights(targets, logits.dtype)  # (N,), summing to 1 over the scored positions
    targets = xp.where(targets == IGNORE, 0, targets)  # any valid id: its weight is 0
    shifted = logits - logits.max(axis=-1, keepdims=True)  # (N, V), max 0 per row: exp cannot overflow
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))  # (N, V) log softmax
    nll = -xp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]  # (N,) -log p[target]
    loss = (weights * nll).sum()
    probs = xp.exp(log_probs)  # (N, V)
    # END SOLUTION
    return loss, CrossEntropyCache(probs=probs, targets=targets, weights=weights, logits_shape=logits_shape)


def cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """Gradient of the mean cross-entropy.   dloss: a number or 0-d array -> dlogits: (..., V).

    Derivation (a1):
        dlogits_n = dloss * weights_n * (probs_n - onehot(targets_n)), in the logits' shape (..., V);
        weights_n = 1 / N for every n when all N targets are scored.
    """
    xp = get_xp(cache.probs)
    N = cache.probs.shape[0]
    # BEGIN SOLUTION a1: dlogits (N, V) from the cached probs, targets and weights, times dloss
    onehot = xp.zeros_like(cache.probs)  # (N, V)
    onehot[xp.arange(N), cache.targets] = 1.0
    dlogits = (cache.probs - onehot) * (dloss * cache.weights[:, None])
    # END SOLUTION
    return dlogits.reshape(cache.logits_shape)
