"""Batches of whole examples, each a token sequence with the tokens the loss scores marked.

An instruction-tuning example is a conversation rendered to token ids, with ``trained`` marking the
tokens the model should learn to produce (the assistant's, io/chat_data.py). As a language-modelling
example its inputs are ids[:-1] and its targets ids[1:], and a target is scored only where trained:

    x = ids[:-1]        y = where(trained[1:], ids[1:], IGNORE)        (IGNORE: layers/cross_entropy.py)

An example longer than T + 1 tokens is cut to its first T + 1. Two layouts make (B, T) batches:

- padded: one example per row, the rest of the row padding (input PAD, target IGNORE). Causal
  attention already keeps a row's tokens from seeing its padding, which comes after them.
- packed: examples one after another in a row while they fit, then padding. ``positions[b, t]``
  counts within each example and restarts at 0, so that RoPE (or GPT-2's position table) sees every
  example from position 0, and the attention keeps each token within its own example
  (layers/attention.py). The padding at a row's end counts as one more example of its own.

The same examples give the same loss and gradients in either layout (the loss is the mean over the
scored targets; tests/test_packing.py checks 1e-12 in float64); packed, they take fewer rows, so a
step spends less work on padding.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..layers import IGNORE

PAD = 0  # the input id of a padding position: any valid id does (its target is IGNORE, nothing sees it)


class Batch(NamedTuple):
    """One batch: (B, T) inputs and targets, and for packed rows each token's position in its example."""

    x: np.ndarray  # (B, T) int64 input ids
    y: np.ndarray  # (B, T) int64 target ids, IGNORE where not scored
    positions: np.ndarray | None = None  # (B, T) int64, or None: each row one sequence from position 0


class Example(NamedTuple):
    """A token sequence and which of its tokens are trained (the loss scores them as targets)."""

    ids: np.ndarray  # (L,) token ids
    trained: np.ndarray  # (L,) bool

    def pair(self, T: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), each (n,) with n = min(L - 1, T): inputs, and targets with IGNORE where not trained."""
        ids, trained = self.ids[: T + 1], self.trained[: T + 1]
        return ids[:-1], np.where(trained[1:], ids[1:], IGNORE)

    def scored(self, T: int) -> int:
        """How many of the example's targets the loss scores, cut to T."""
        return int(self.trained[1 : T + 1].sum())


def empty_rows(B: int, T: int) -> Batch:
    """B rows of padding: inputs PAD, targets IGNORE."""
    return Batch(np.full((B, T), PAD, dtype=np.int64), np.full((B, T), IGNORE, dtype=np.int64))


def padded_batch(examples: list[Example], T: int) -> Batch:
    """One example per row, each cut to T targets and padded to T: a (len(examples), T) batch."""
    batch = empty_rows(len(examples), T)
    for row, example in enumerate(examples):
        x, y = example.pair(T)
        batch.x[row, : len(x)], batch.y[row, : len(y)] = x, y
    return batch  # each row one sequence (positions None): plain causal attention


def pack_rows(lengths: list[int], T: int, rows: int | None = None) -> list[list[int]]:
    """Which examples go in which row: in the given order, each in the current row if it fits, else the next.

    lengths: the examples' input lengths, each at most T. With ``rows``, packing stops at the first
    example that would need one more row: the rows hold the examples before it.
    """
    packed, used = [[]], 0
    for index, length in enumerate(lengths):
        if used + length > T:
            if rows is not None and len(packed) == rows:
                break
            packed.append([])
            used = 0
        packed[-1].append(index)
        used += length
    return packed if packed[0] else []


def packed_batch(examples: list[Example], rows: list[list[int]], T: int) -> Batch:
    """The examples placed in rows as ``rows`` says (pack_rows), then padding: a (len(rows), T) batch."""
    batch = empty_rows(len(rows), T)._replace(positions=np.empty((len(rows), T), dtype=np.int64))
    for row, indices in enumerate(rows):
        start = 0
        for index in indices:
            x, y = examples[index].pair(T)
            end = start + len(x)
            batch.x[row, start:end], batch.y[row, start:end] = x, y
            batch.positions[row, start:end] = np.arange(len(x))
            start = end
        batch.positions[row, start:] = np.arange(T - start)  # the padding: one more example of its own
    return batch


def input_length(example: Example, T: int) -> int:
    """The number of input positions the example takes in a row: its length minus one, at most T."""
    return min(len(example.ids) - 1, T)


class ExampleSet:
    """Examples and their layout (padded or packed): the training batches and the evaluation batches.

    Every example needs at least two tokens (an input and its target) and one trained target.
    """

    def __init__(self, examples: list[Example], packing: bool = False):
        self.examples = list(examples)
        self.packing = packing
        self.shortest = min(len(example.ids) - 1 for example in self.examples)  # inputs of the shortest

    def __len__(self) -> int:
        return len(self.examples)

    def train_batch(self, B: int, T: int, rng: np.random.Generator) -> Batch:
        """A (B, T) batch of examples drawn uniformly at random (with replacement) by ``rng``.

        Padded: B examples. Packed: the examples drawn before the first that would need row B + 1.
        """
        if not self.packing:
            return padded_batch([self.examples[i] for i in rng.integers(0, len(self), B)], T)
        shortest = min(self.shortest, T)  # its input length in a row of T
        drawn = rng.integers(
            0, len(self), B * (T // shortest) + 1
        )  # more than B rows can hold, whatever is drawn
        candidates = [self.examples[i] for i in drawn]
        return packed_batch(candidates, pack_rows(lengths(candidates, T), T, B), T)

    def evaluation_batches(self, batch_size: int, T: int, max_examples: int | None = None):
        """The examples in order (``max_examples`` of them spread evenly, if given), batch_size rows at a time."""
        chosen = self.examples
        if max_examples is not None and max_examples < len(chosen):
            picks = np.linspace(0, len(chosen) - 1, max_examples).round().astype(int)
            chosen = [chosen[i] for i in picks]
        if not self.packing:
            for start in range(0, len(chosen), batch_size):
                yield padded_batch(chosen[start : start + batch_size], T)
            return
        rows = pack_rows(lengths(chosen, T), T)
        for start in range(0, len(rows), batch_size):
            yield packed_batch(chosen, rows[start : start + batch_size], T)


def lengths(examples: list[Example], T: int) -> list[int]:
    """Each example's input length in a row of T positions."""
    return [input_length(example, T) for example in examples]
