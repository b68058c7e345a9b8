"""Trading compute for activation memory in a Llama step: gradient checkpointing (blocks recomputed in
the backward) and the head with its loss taken a chunk of rows at a time. Each must give the plain
step's loss and gradients, keep what it says it keeps, and hold less at its peak."""

import tracemalloc

import numpy as np
import pytest

from minilora.activation_memory import BlockCheckpoint, ChunkedHeadLoss
from minilora.gradcheck import check_model
from minilora.llama import Llama, LlamaConfig, init_llama_params
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.quant import quantize_nf4

CONFIG = LlamaConfig(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=24, vocab_size=29, block_size=12)
LORA = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init="random", lora_dropout=0.3)


def lora_llama(dtype=np.float64, seed=0, config=CONFIG, quantized=False):
    params = init_llama_params(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for value in params.values():
        value += (0.2 * rng.standard_normal(value.shape)).astype(dtype)
    if quantized:  # the tied head is then a quantized table, read slab by slab
        params["model.embed_tokens.weight"] = quantize_nf4(params["model.embed_tokens.weight"], "table")
    return add_lora(Llama(config, params), LORA, seed=4)


def batch(B=2, T=7, seed=3, vocab=CONFIG.vocab_size):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (B, T)), rng.integers(0, vocab, (B, T))


def loss_and_grads(model, idx, targets, dropout_seed=11):
    logits, loss, cache = model.forward(idx, targets, dropout_rng=np.random.default_rng(dropout_seed))
    return logits, float(loss), model.backward(cache, dloss=1.7), cache


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize(
    "checkpointing, chunk_rows", [(True, None), (False, 5), (True, 3)], ids=["checkpoint", "chunk5", "both"]
)
def test_the_memory_switches_give_the_plain_steps_loss_and_gradients(checkpointing, chunk_rows, quantized):
    idx, targets = batch()  # 14 rows: chunks of 5 and 3 leave a short last chunk
    plain = lora_llama(quantized=quantized)
    _, plain_loss, plain_grads, _ = loss_and_grads(plain, idx, targets)
    model = lora_llama(quantized=quantized)
    model.gradient_checkpointing, model.loss_chunk_rows = checkpointing, chunk_rows
    logits, loss, grads, cache = loss_and_grads(model, idx, targets)
    assert loss == pytest.approx(plain_loss, rel=1e-13)
    assert list(grads) == list(plain_grads)
    for name in grads:  # the same dropout masks are drawn again for the recomputed blocks
        np.testing.assert_allclose(grads[name], plain_grads[name], rtol=1e-11, atol=1e-14, err_msg=name)
    assert all(isinstance(block, BlockCheckpoint) for block in cache.blocks) == checkpointing
    assert (logits is None) == (chunk_rows is not None) and isinstance(cache.loss, ChunkedHeadLoss) == (
        chunk_rows is not None
    )


def test_a_checkpointed_chunked_step_matches_finite_differences():
    model = lora_llama()
    model.gradient_checkpointing, model.loss_chunk_rows = True, 4
    idx, targets = batch(T=5)
    check_model(model, idx, targets, n_samples=2, dropout_seed=9).assert_ok(1e-6)


def test_generation_and_evaluation_are_untouched_by_the_switches():
    model = lora_llama()
    model.gradient_checkpointing, model.loss_chunk_rows = True, 4
    idx, _ = batch()
    logits, loss, cache = model.forward(idx)  # no targets: the logits, nothing kept for a backward
    assert logits.shape == (2, 7, CONFIG.vocab_size) and loss is None
    model.gradient_checkpointing, model.loss_chunk_rows = False, None
    np.testing.assert_array_equal(model.forward(idx)[0], logits)


def test_chunked_loss_refuses_a_trainable_head_in_one_line():
    model = Llama(CONFIG, init_llama_params(CONFIG, dtype=np.float64))  # everything trainable
    model.loss_chunk_rows = 4
    with pytest.raises(ValueError, match="'model.embed_tokens.weight' is trainable"):
        model.forward(*batch())


def peak_step_bytes(model, idx, targets) -> int:
    tracemalloc.start()  # NumPy reports its buffers to tracemalloc
    tracemalloc.reset_peak()
    _, loss, cache = model.forward(idx, targets)
    model.backward(cache)
    del cache
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_each_switch_lowers_the_peak_by_what_it_drops():
    config = LlamaConfig(
        n_layer=6, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=96, vocab_size=512, block_size=64
    )
    idx, targets = batch(B=4, T=64, vocab=config.vocab_size)
    N = idx.size
    peaks = {}
    for name, checkpointing, chunk in [
        ("plain", False, None),
        ("checkpoint", True, None),
        ("chunk", False, 32),
    ]:
        model = lora_llama(np.float32, config=config)
        model.gradient_checkpointing, model.loss_chunk_rows = checkpointing, chunk
        peaks[name] = peak_step_bytes(model, idx, targets)
    logits_bytes = N * config.vocab_size * 4  # float32 (N, V): 1 MiB here
    # the plain step holds the logits and their probabilities (2 x 1 MiB) at the loss; chunks of 32 rows
    # hold 1/8 of that: at least one logits-sized array is saved
    assert peaks["plain"] - peaks["chunk"] > logits_bytes
    # six blocks' activations (attention probabilities, MLP) against one block's plus six inputs
    block_input = N * config.n_embd * 4
    attention_probs = 4 * config.n_head * 64 * 64 * 4
    assert peaks["plain"] - peaks["checkpoint"] > 4 * (attention_probs + block_input)
