"""A smoothed character (byte) 4-gram model: the baseline a neural model has to beat.

A 4-gram model predicts each byte from the 3 bytes before it by counting, in the training text, how
often each byte followed each 3-byte context. Unseen combinations need smoothing; we use
interpolated Witten-Bell smoothing (Witten & Bell, 1991), which mixes each order with the next lower
one, recursively down to a uniform distribution over the 256 byte values:

    P_k(x | h) = (c(h, x) + u(h) P_{k-1}(x | h')) / (c(h) + u(h))

where h is the k-byte context, h' its last k-1 bytes, c(h, x) the count of h followed by x, c(h) the
count of h, and u(h) the number of distinct bytes ever seen after h. A context never seen falls back
to P_{k-1}. P_{-1} is uniform, 1/256.

Counting is vectorised: an n-gram of bytes is packed into one integer, np.unique counts them and
np.searchsorted looks them up. Positions 0..2 of the scored text, which lack a full context, are
not scored.
"""

from __future__ import annotations

import math

import numpy as np

ORDER = 4  # 4-gram: 3 bytes of context
VOCAB = 256


def pack(data: np.ndarray, positions: np.ndarray, length: int) -> np.ndarray:
    """The `length` bytes ending at each position (inclusive), packed big-endian into one int64 each."""
    key = np.zeros(len(positions), dtype=np.int64)
    for offset in range(length - 1, -1, -1):  # loop over n-gram length (at most 4), not over data
        key = key * VOCAB + data[positions - offset]
    return key


class ByteNgramCounts:
    """Counts of every k-gram (k = 1..ORDER) and of distinct followers of every context."""

    def __init__(self, train: np.ndarray, order: int = ORDER):
        train = np.asarray(train, dtype=np.int64)
        self.order = order
        self.ngrams, self.ngram_counts = [], []  # per context length k: sorted packed (h, x) and counts
        self.contexts, self.context_counts, self.followers = [], [], []  # per k: sorted h, c(h), u(h)
        for k in range(order):  # k = context length
            positions = np.arange(k, len(train))
            keys, counts = np.unique(pack(train, positions, k + 1), return_counts=True)
            self.ngrams.append(keys)
            self.ngram_counts.append(counts)
            context_of_key = keys // VOCAB  # the context h of each distinct (h, x)
            contexts, first = np.unique(context_of_key, return_index=True)
            self.contexts.append(contexts)
            self.context_counts.append(np.add.reduceat(counts, first))  # c(h) = sum over x of c(h, x)
            self.followers.append(np.diff(np.append(first, len(keys))))  # u(h) = distinct x after h

    @staticmethod
    def lookup(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """values[i] where sorted_keys[i] == query, else 0, for every query at once."""
        index = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
        return np.where(sorted_keys[index] == queries, values[index], 0)

    def probabilities(self, data: np.ndarray) -> np.ndarray:
        """P(data[i] | data[i-3:i]) for i = ORDER-1 .. len(data)-1, interpolated Witten-Bell."""
        data = np.asarray(data, dtype=np.int64)
        positions = np.arange(self.order - 1, len(data))
        prob = np.full(len(positions), 1.0 / VOCAB)  # P_{-1}: uniform
        for k in range(self.order):  # from unigrams up to the full context
            ngram = pack(data, positions, k + 1)
            context = ngram // VOCAB
            c_hx = self.lookup(self.ngrams[k], self.ngram_counts[k], ngram)
            c_h = self.lookup(self.contexts[k], self.context_counts[k], context)
            u_h = self.lookup(self.contexts[k], self.followers[k], context)
            seen = c_h > 0
            mixed = (c_hx + u_h * prob) / np.where(seen, c_h + u_h, 1)
            prob = np.where(seen, mixed, prob)  # an unseen context keeps the lower order's estimate
        return prob


def ngram_bits_per_byte(train: np.ndarray, val: np.ndarray, order: int = ORDER) -> float:
    """Mean -log2 P of each byte of ``val`` under a Witten-Bell byte n-gram model counted on ``train``."""
    prob = ByteNgramCounts(train, order).probabilities(val)
    return float(-np.log(prob).mean() / math.log(2))
