"""Sampling text from a model, with a key/value cache so that each new token costs one position.

Without a cache, generating token t means running the model over all t previous positions again.
But in a causal model the keys and values of old positions never change: only the newest position's
query is new. So we keep every layer's keys and values, (B, H, T_max, hs) each, and per new token
run the model's own blocks on one position (``model.forward(idx, kv_cache=cache)``), attending over
the cached keys and values.

Positions are absolute (a learned table of block_size rows), so once the context is full the cache
cannot simply slide. We then keep the last block_size // 2 tokens (at least one), rebuild the cache
from them in one pass (a "prefill"), and go on; the rebuild happens once every block_size // 2 tokens.
A prompt longer than the block is cut the same way: the model sees its last block_size tokens.

Sampling divides the logits by the temperature and draws from their softmax; temperature 0 is greedy
decoding (the most likely token). Logits that are NaN or infinite (a broken weight, an infinite
lora_alpha) raise instead of turning into token 0.

This is inference only: no dropout, no backward, and nothing is kept for a backward pass.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import host_rng, to_numpy
from .io.tokenizer import decode, encode


class KVCache:
    """Keys and values of every layer for the positions seen so far (``length`` of them), for a GPT or a Llama."""

    def __init__(self, model, batch_size: int):
        config = model.config
        shape = (batch_size, config.n_kv_head, config.block_size, config.head_size)  # (B, H_kv, T_max, hs)
        xp, dtype = model.xp, model.params[model.embedding_name].dtype
        self.keys = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled


def next_logits(model, idx, cache: KVCache):
    """Logits after the last of the new tokens idx (B, t), given the cache; updates the cache.   -> (B, V)"""
    logits, _, _ = model.forward(idx, kv_cache=cache)  # (B, t, V)
    return logits[:, -1]


def check_sampling(temperature: float, top_k: int | None) -> None:
    """Raise ValueError unless temperature is finite and >= 0 (0: greedy) and top_k is None or >= 1."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 picks the most likely token), got {temperature}"
        )
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def sample_next(
    logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int | None
) -> np.ndarray:
    """One token id per row of host logits (B, V): greedy for temperature 0, else softmax(logits / T) sampling.

    top_k keeps only the k most likely tokens of each row before sampling. Non-finite logits raise
    FloatingPointError. The row's maximum is subtracted before dividing by the temperature, so every
    scaled logit is <= 0: one whose division overflows becomes -inf, probability 0. At a temperature
    so small (1e-320) that every token but the most likely one overflows, this is greedy decoding.
    """
    check_sampling(temperature, top_k)
    finite = np.isfinite(logits).all(axis=-1)  # (B,)
    if not finite.all():
        raise FloatingPointError(
            f"the model's logits are NaN or infinite (row {int(np.argmin(finite))}): a weight or an adapter "
            "(lora_alpha?) is not finite"
        )
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits.astype(np.float64)
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]  # (B, 1)
        logits = np.where(logits < kth_largest, -np.inf, logits)
    with np.errstate(over="ignore"):  # an overflow is a -inf: that token's probability is 0
        scaled = (logits - logits.max(axis=-1, keepdims=True)) / temperature  # (B, V), all <= 0
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    cumulative = probs.cumsum(axis=-1)  # inverse-CDF sampling, one uniform draw per row
    draws = rng.random((logits.shape[0], 1))
    return np.minimum((cumulative < draws * cumulative[:, -1:]).sum(axis=-1), logits.shape[-1] - 1)


def checked_request(prompt_ids, max_new_tokens: int, temperature: float, top_k: int | None) -> np.ndarray:
    """A decoder's arguments checked (one ValueError naming the bad one): the prompt ids as int64 (B, T0)."""
    check_sampling(temperature, top_k)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must have shape (B, T0) with T0 >= 1, got {prompt_ids.shape}")
    return prompt_ids


def generate_ids(
    model,
    prompt_ids: np.ndarray,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_id: int | None = None,
) -> np.ndarray:
    """Extend each row of prompt_ids (B, T0) by up to max_new_tokens sampled tokens; returns (B, T0 + n).

    With ``stop_id`` (a chat model's end-of-turn token), a row that has produced it produces it again
    from then on, and generation ends once every row has. The ids live in one (B, T0 + max_new_tokens)
    buffer, allocated once and filled in place.
    """
    prompt_ids = checked_request(prompt_ids, max_new_tokens, temperature, top_k)
    B, T0 = prompt_ids.shape
    block_size = model.config.block_size
    keep = max(1, block_size // 2)  # positions kept when the context is full
    rng = host_rng(seed)
    tokens = np.empty((B, T0 + max_new_tokens), dtype=np.int64)  # (B, T0 + max_new_tokens)
    tokens[:, :T0] = prompt_ids
    n = T0  # ids filled so far
    cache = KVCache(model, B)
    logits = next_logits(model, prompt_ids[:, -block_size:], cache)  # prefill on the last block; (B, V)
    stopped = np.zeros(B, dtype=bool)  # (B,) rows that produced stop_id
    for step in range(max_new_tokens):
        next_ids = sample_next(to_numpy(logits), rng, temperature, top_k)  # (B,)
        if stop_id is not None:
            next_ids = np.where(stopped, stop_id, next_ids)
            stopped |= next_ids == stop_id
        tokens[:, n] = next_ids
        n += 1
        if step == max_new_tokens - 1 or stopped.all():
            break  # the last token needs no logits after it
        if cache.length == block_size:  # context full: restart from the most recent tokens
            cache = KVCache(model, B)
            logits = next_logits(model, tokens[:, n - keep : n], cache)
        else:
            logits = next_logits(model, next_ids[:, None], cache)
    return tokens[:, :n]


def generate(
    model,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    tokenizer=None,
    decoder=generate_ids,
) -> str:
    """The prompt followed by up to max_new_tokens sampled tokens, decoded as UTF-8 text.

    tokenizer: None for the byte-level models (a token is a byte); or one with encode, decode and
    eos_id (a BPETokenizer, io/bpe.py), whose end-of-sequence token ends the text early (and is
    left out of it).
    decoder: the function that extends the prompt's ids, ``generate_ids`` above or one with its
    signature and results (the seam for a faster one: ``minilora.fast.accelerate_generation``).
    """
    if not prompt:
        raise ValueError("the prompt is empty: give at least one character to start from")
    prompt_ids = encode(prompt) if tokenizer is None else tokenizer.encode(prompt)
    stop_id = None if tokenizer is None else tokenizer.eos_id
    ids = decoder(
        model,
        np.asarray(prompt_ids, dtype=np.int64)[None, :],
        max_new_tokens,
        temperature,
        top_k,
        seed,
        stop_id,
    )
    if tokenizer is None:
        return decode(ids[0])
    new = ids[0, len(prompt_ids) :]  # (n,)
    stops = np.flatnonzero(new == stop_id)
    return tokenizer.decode(ids[0, : len(prompt_ids) + (stops[0] if stops.size else len(new))])
