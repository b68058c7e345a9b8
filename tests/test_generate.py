"""Generation: the KV-cache path computes the same logits as the full forward, and sampling is seeded."""

import numpy as np
import pytest

from minilora.config import GPTConfig
from minilora.generate import KVCache, generate, generate_ids, sample_next
from minilora.model import GPT, init_params

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=256)


@pytest.fixture
def model():
    params = init_params(CONFIG, seed=0, dtype=np.float64)
    rng = np.random.default_rng(1)
    for value in params.values():
        value += 0.3 * rng.standard_normal(value.shape)  # a peaked, non-degenerate distribution
    return GPT(CONFIG, params)


def test_cached_logits_one_token_at_a_time_equal_the_full_forward(model):
    ids = np.random.default_rng(2).integers(0, 256, (3, CONFIG.block_size))
    full, _, _ = model.forward(ids)
    cache = KVCache(model, 3)
    prefill = model.forward(ids[:, :5], kv_cache=cache)[0]  # a prompt of 5, then one token at a time
    steps = [model.forward(ids[:, t : t + 1], kv_cache=cache)[0] for t in range(5, CONFIG.block_size)]
    incremental = np.concatenate([prefill, *steps], axis=1)
    np.testing.assert_allclose(incremental, full, rtol=0, atol=1e-12)


def test_cache_refuses_to_overflow_block_size(model):
    cache = KVCache(model, 1)
    model.forward(np.zeros((1, CONFIG.block_size), dtype=np.int64), kv_cache=cache)
    with pytest.raises(ValueError, match="exceed block_size=12"):
        model.forward(np.zeros((1, 1), dtype=np.int64), kv_cache=cache)


def test_greedy_generation_equals_a_naive_generator_without_cache(model):
    prompt = [10, 20, 30]
    ids = generate_ids(
        model, np.array([prompt]), max_new_tokens=25, temperature=0
    )  # crosses block_size twice
    tokens, start = list(prompt), 0  # the naive way: rerun the full forward on the kept context each time
    for _ in range(25):
        if len(tokens) - start > CONFIG.block_size:  # context full: keep the most recent half
            start = len(tokens) - CONFIG.block_size // 2
        logits, _, _ = model.forward(np.array([tokens[start:]]))
        tokens.append(int(logits[0, -1].argmax()))
    assert ids.tolist() == [tokens]


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds(model):
    a = generate(model, "To be", max_new_tokens=40, temperature=1.0, seed=3)
    b = generate(model, "To be", max_new_tokens=40, temperature=1.0, seed=3)
    c = generate(model, "To be", max_new_tokens=40, temperature=1.0, seed=4)
    assert a == b and a != c and a.startswith("To be")


def test_top_k_restricts_samples_to_the_k_most_likely_tokens():
    logits = np.log(np.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 2000))
    samples = sample_next(logits, np.random.default_rng(0), temperature=1.0, top_k=2)
    assert set(np.unique(samples)) == {0, 1}
    assert abs(np.mean(samples == 0) - 0.5 / 0.8) < 0.03  # renormalised over the top 2


def test_sampling_matches_the_softmax_distribution():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    samples = sample_next(np.log(np.tile(probs, (20000, 1))), np.random.default_rng(1), 1.0, None)
    np.testing.assert_allclose(np.bincount(samples, minlength=4) / 20000, probs, atol=0.01)


@pytest.mark.parametrize("kwargs, message", [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k")])
def test_bad_sampling_settings_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, "a", max_new_tokens=2, **kwargs)


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, "")
