"""The CPU step split across threads: same loss and gradients as the one-piece step, in float64.

The reference is the model's own forward/backward on the whole batch, which the gradient checks and
the transformers oracle already verify; splitting the batch must change nothing but rounding.
"""

import sys

import numpy as np
import pytest

from minilora.config import GPTConfig
from minilora.fast.cpu.host_memory import retain_freed_memory
from minilora.fast.cpu.sharded_step import (
    THREADS_ENV_VAR,
    cpu_threads,
    sharded_forward_backward,
    sharded_train_step,
)
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.optim import AdamW
from minilora.training.step import split_bounds, train_step

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)


def batch(B, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CONFIG.vocab_size, (B, 8)), rng.integers(0, CONFIG.vocab_size, (B, 8))


def forward_backward(model, x, y, dropout_key=None, shards=2):
    return sharded_forward_backward(model, x, y, dropout_key, split_bounds(x.shape[0], shards))


def whole_batch(model, x, y):
    _, loss, cache = model.forward(x, y)
    return float(loss), model.backward(cache)


@pytest.mark.parametrize("B, shards", [(4, 2), (5, 2), (5, 3), (3, 8)])
def test_sharded_step_equals_whole_batch_full_model(B, shards):
    model = GPT(CONFIG, init_params(CONFIG, seed=1, dtype=np.float64))
    x, y = batch(B)
    loss_ref, grads_ref = whole_batch(model, x, y)
    loss, grads = forward_backward(model, x, y, shards=shards)
    assert float(loss) == pytest.approx(loss_ref, rel=1e-13)
    assert set(grads) == set(grads_ref)
    for name, ref in grads_ref.items():
        np.testing.assert_allclose(grads[name], ref, rtol=1e-10, atol=1e-14, err_msg=name)


def test_sharded_step_equals_whole_batch_lora():
    base = GPT(CONFIG, init_params(CONFIG, seed=2, dtype=np.float64))
    model = add_lora(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=("c_attn", "attn.c_proj"), init="random"), seed=3
    )
    x, y = batch(6, seed=4)
    loss_ref, grads_ref = whole_batch(model, x, y)
    loss, grads = forward_backward(model, x, y, shards=2)
    assert float(loss) == pytest.approx(loss_ref, rel=1e-13)
    assert sorted(grads) == sorted(grads_ref) == sorted(model.trainable_names)
    for name, ref in grads_ref.items():
        np.testing.assert_allclose(grads[name], ref, rtol=1e-10, atol=1e-14, err_msg=name)


def test_dropout_masks_are_seeded_per_shard_and_reproducible():
    model = GPT(
        GPTConfig.from_dict({**CONFIG.to_dict(), "dropout": 0.2}), init_params(CONFIG, dtype=np.float64)
    )
    x, y = batch(4)
    loss_a, grads_a = forward_backward(model, x, y, dropout_key=(0, 1, 7), shards=2)
    loss_b, grads_b = forward_backward(model, x, y, dropout_key=(0, 1, 7), shards=2)
    loss_c, _ = forward_backward(model, x, y, dropout_key=(0, 1, 8), shards=2)
    loss_none, _ = forward_backward(model, x, y, shards=2)
    assert float(loss_a) == float(loss_b)
    for name in grads_a:
        np.testing.assert_array_equal(grads_a[name], grads_b[name])
    assert float(loss_a) != float(loss_c)  # another step, other masks
    assert float(loss_a) != float(loss_none)  # dropout was applied


def test_sharded_train_step_takes_the_same_step_as_the_reference_train_step():
    models = [GPT(CONFIG, init_params(CONFIG, seed=5, dtype=np.float64)) for _ in range(2)]
    optimizers = [AdamW(model.params, model.trainable_names, lr=1e-2, weight_decay=0.1) for model in models]
    x, y = batch(5, seed=6)
    for _ in range(2):
        loss_ref = train_step(models[0], optimizers[0], x, y, 1e-2, grad_clip=0.5)
        loss = sharded_train_step(shards=2)(models[1], optimizers[1], x, y, 1e-2, grad_clip=0.5)
        assert float(loss) == pytest.approx(float(loss_ref), rel=1e-12)
    for name, ref in models[0].params.items():
        np.testing.assert_allclose(models[1].params[name], ref, rtol=1e-9, atol=1e-12, err_msg=name)


def test_split_bounds_cover_the_batch_without_empty_shards():
    assert split_bounds(16, 2) == [(0, 8), (8, 16)]
    assert split_bounds(5, 2) in ([(0, 2), (2, 5)], [(0, 3), (3, 5)])
    assert split_bounds(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert split_bounds(7, 1) == [(0, 7)]


def test_cpu_threads_reads_the_environment(monkeypatch):
    monkeypatch.setenv(THREADS_ENV_VAR, "3")
    assert cpu_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(THREADS_ENV_VAR, bad)
        with pytest.raises(ValueError, match=THREADS_ENV_VAR):
            cpu_threads()
    monkeypatch.delenv(THREADS_ENV_VAR)
    assert cpu_threads() >= 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_retain_freed_memory_configures_glibc():
    assert retain_freed_memory() is True
