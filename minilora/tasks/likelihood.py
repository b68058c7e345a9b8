"""Multiple choice by log-likelihood: which option does the model find the likeliest continuation?

Nothing is generated. Each option is appended to the context, and the model's log-probabilities of
the option's own tokens are summed: log p(option | context) = sum_t log p(option_t | context,
option_<t). The context and each option are encoded separately and the ids joined, so every option
is cut into the same tokens wherever it appears; a task puts the white space between them at the
option's start (" Sudden, ..."), where a subword tokenizer expects it. The context is never scored.

The plain sum favours short options: every token costs log-probability, so a short wrong line can
outscore a long right one. ``choice_accuracy`` therefore ranks by the sum divided by the option's
length in UTF-8 bytes (log-likelihood per byte, comparable across tokenizers, as bits per byte are),
and reports the plain sum's accuracy beside it.

The k options of an item go through the model as one batch of k rows, right-padded with id 0
(a causal model never looks right, so the padding changes no scored position). A row keeps as much
of the context as fits the model's block with its option: the context is cut from the left.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..backend import to_numpy
from .task import ChoiceItem, TaskScore


def option_rows(context_ids: np.ndarray, option_ids: list[np.ndarray], block_size: int):
    """Each option after the end of the context that fits with it in ``block_size`` + 1 tokens.

    Returns (ids (k, L) right-padded with 0, first (k,) where each option starts, end (k,) where it ends).
    """
    rows = []
    for ids in option_ids:
        room = block_size + 1 - len(ids)  # inputs are the row minus its last token: at most block_size
        if room < 1 or len(context_ids) == 0:
            raise ValueError(
                f"an option of {len(ids)} tokens after a context of {len(context_ids)} does not fit a block "
                f"of {block_size}: every option needs at least one token of context before it"
            )
        rows.append(np.concatenate([context_ids[-room:], ids]))
    batch = np.zeros((len(rows), max(len(row) for row in rows)), dtype=np.int64)  # (k, L)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = row
    end = np.array([len(row) for row in rows])  # (k,)
    return batch, end - np.array([len(ids) for ids in option_ids]), end


def token_log_probs(model, batch: np.ndarray) -> np.ndarray:
    """log p(batch[:, j] | batch[:, :j]) for every j >= 1, by one forward pass.   (k, L) -> (k, L - 1)"""
    logits, _, _ = model.forward(batch[:, :-1])  # (k, L - 1, V), on the model's device
    xp = model.xp
    top = logits.max(axis=-1, keepdims=True)  # (k, L - 1, 1): subtracted before exp, so nothing overflows
    log_normaliser = top + xp.log(xp.exp(logits - top).sum(axis=-1, keepdims=True))  # log sum_v exp(logit_v)
    targets = xp.asarray(batch[:, 1:])[..., None]  # (k, L - 1, 1)
    picked = xp.take_along_axis(logits, targets, axis=-1) - log_normaliser  # log p of each next token
    return to_numpy(picked[..., 0]).astype(np.float64)


def option_log_likelihoods(model, tokenizer, context: str, options) -> np.ndarray:
    """log p(option | context) for each option, in nats: the sum over the option's tokens.   -> (k,)"""
    context_ids = np.asarray(tokenizer.encode(context), dtype=np.int64)  # (T_c,)
    option_ids = [np.asarray(tokenizer.encode(option), dtype=np.int64) for option in options]
    batch, first, end = option_rows(context_ids, option_ids, model.config.block_size)
    scored = token_log_probs(model, batch)  # (k, L - 1): column j - 1 scores token j
    columns = np.arange(scored.shape[1])[None, :]  # (1, L - 1)
    in_option = (columns >= first[:, None] - 1) & (columns < end[:, None] - 1)  # (k, L - 1)
    return np.where(in_option, scored, 0.0).sum(axis=1)


def choice_accuracy(
    model, tokenizer, items: list[ChoiceItem], progress: bool = False, name: str = ""
) -> TaskScore:
    """The fraction of items whose right option has the highest log-likelihood per byte; by the sum in details."""
    by_byte = by_sum = 0
    for item in tqdm(items, desc=name, unit="item", disable=not progress, leave=False):
        total = option_log_likelihoods(model, tokenizer, item.context, item.options)  # (k,)
        n_bytes = np.array([len(option.encode("utf-8")) for option in item.options])  # (k,)
        by_byte += int(np.argmax(total / n_bytes)) == item.label
        by_sum += int(np.argmax(total)) == item.label
    return TaskScore(by_byte / len(items), {"accuracy_by_sum": by_sum / len(items)})
