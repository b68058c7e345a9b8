"""Trading compute for activation memory in a GPT step: gradient checkpointing (blocks recomputed in the
backward, with GPT-2's dropout masks drawn again) and the tied head with its loss taken a chunk of rows
at a time. Each must give the plain step's loss and gradients, keep what it says it keeps, and hold
less at its peak."""

import tracemalloc

import numpy as np
import pytest

from minilora.activation_memory import BlockCheckpoint, ChunkedHeadLoss
from minilora.config import WTE, GPTConfig
from minilora.gradcheck import check_model
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params

CONFIG = GPTConfig(n_layer=3, n_head=4, n_embd=32, block_size=12, vocab_size=29, dropout=0.2)
LORA = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init="random", lora_dropout=0.3)


def full_gpt(dtype=np.float64, seed=0, config=CONFIG, frozen=()):
    """A GPT off GPT-2's init (unit gains and zero biases hide mistakes)."""
    params = init_params(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for value in params.values():
        value += (0.2 * rng.standard_normal(value.shape)).astype(dtype)
    return GPT(config, params, frozen=frozen)


def lora_gpt(dtype=np.float64, seed=0, config=CONFIG):
    return add_lora(full_gpt(dtype, seed, config), LORA, seed=4)


def batch(B=2, T=7, seed=3, vocab=CONFIG.vocab_size):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (B, T)), rng.integers(0, vocab, (B, T))


def loss_and_grads(model, idx, targets, dropout_seed=11):
    logits, loss, cache = model.forward(idx, targets, dropout_rng=np.random.default_rng(dropout_seed))
    return logits, float(loss), model.backward(cache, dloss=1.7), cache


def make_model(kind: str, chunk_rows):
    """The LoRA GPT, or the full GPT: every parameter trains, but wte is frozen where loss chunks need it."""
    if kind == "lora":
        return lora_gpt()
    return full_gpt(frozen=() if chunk_rows is None else (WTE,))


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize(
    "checkpointing, chunk_rows", [(True, None), (False, 5), (True, 3)], ids=["checkpoint", "chunk5", "both"]
)
def test_the_memory_switches_give_the_plain_steps_loss_and_gradients(checkpointing, chunk_rows, kind):
    idx, targets = batch()  # 14 rows: chunks of 5 and 3 leave a short last chunk
    _, plain_loss, plain_grads, _ = loss_and_grads(make_model(kind, chunk_rows), idx, targets)
    model = make_model(kind, chunk_rows)
    model.set_activation_memory(checkpointing, chunk_rows)
    logits, loss, grads, cache = loss_and_grads(model, idx, targets)
    assert loss == pytest.approx(plain_loss, rel=1e-13)
    assert list(grads) == list(plain_grads)
    for name in grads:  # the same dropout masks are drawn again for the recomputed blocks
        np.testing.assert_allclose(grads[name], plain_grads[name], rtol=1e-11, atol=1e-14, err_msg=name)
    assert all(isinstance(block, BlockCheckpoint) for block in cache.blocks) == checkpointing
    assert (logits is None) == (chunk_rows is not None) and isinstance(cache.loss, ChunkedHeadLoss) == (
        chunk_rows is not None
    )


def assert_same_arrays(recomputed, kept, where: str):
    """Two caches alike field by field, down to every array (masks, normalised inputs, probabilities)."""
    if isinstance(kept, tuple):
        assert type(recomputed) is type(kept), where
        for field, (a, b) in zip(getattr(kept, "_fields", range(len(kept))), zip(recomputed, kept)):
            assert_same_arrays(a, b, f"{where}.{field}")
    elif isinstance(kept, np.ndarray):
        np.testing.assert_array_equal(recomputed, kept, err_msg=where)
    elif kept is None or isinstance(kept, (int, float, str)):
        assert recomputed == kept, where


def test_a_checkpoint_keeps_the_blocks_input_and_runs_it_again_with_the_same_masks():
    idx, targets = batch()
    plain = lora_gpt()
    plain_cache = plain.forward(idx, targets, dropout_rng=np.random.default_rng(11))[2]
    model = lora_gpt()
    model.gradient_checkpointing = True
    cache = model.forward(idx, targets, dropout_rng=np.random.default_rng(11))[2]
    for i, checkpoint in enumerate(cache.blocks):
        assert checkpoint.x.shape == (2, 7, CONFIG.n_embd)  # the input alone, not the block's activations
        for _ in range(2):  # run again as often as asked, it draws the masks the first forward drew
            recomputed = checkpoint.activations(model, i, cache.example_start)
            assert_same_arrays(recomputed, plain_cache.blocks[i], f"blocks[{i}]")


def test_loss_chunks_keep_only_the_heads_input_gradient():
    idx, targets = batch()
    plain = lora_gpt()
    plain_cache = plain.forward(idx, targets)[2]
    model = lora_gpt()
    model.loss_chunk_rows = 4
    logits, _, cache = model.forward(idx, targets)
    assert logits is None and cache.head is None  # neither the (B, T, V) logits nor the head's cache
    np.testing.assert_allclose(
        cache.loss.dx, plain.head_backward(plain_cache, 1.0)[0], rtol=1e-12, atol=1e-15
    )


def test_a_checkpointed_chunked_step_matches_finite_differences():
    model = lora_gpt()
    model.set_activation_memory(gradient_checkpointing=True, loss_chunk_rows=4)
    idx, targets = batch(T=5)
    check_model(model, idx, targets, n_samples=2, dropout_seed=9).assert_ok(1e-6)


def test_a_checkpointed_full_step_matches_finite_differences():
    model = full_gpt()  # every parameter trains: wte's two gradients and wpe's, through recomputed blocks
    model.set_activation_memory(gradient_checkpointing=True)
    idx, targets = batch(T=5)
    check_model(model, idx, targets, n_samples=2, dropout_seed=9).assert_ok(1e-6)


def test_generation_and_evaluation_are_untouched_by_the_switches():
    model = lora_gpt()
    model.set_activation_memory(gradient_checkpointing=True, loss_chunk_rows=4)
    idx, _ = batch()
    logits, loss, cache = model.forward(idx)  # no targets: the logits, nothing kept for a backward
    assert logits.shape == (2, 7, CONFIG.vocab_size) and loss is None
    model.gradient_checkpointing, model.loss_chunk_rows = False, None
    np.testing.assert_array_equal(model.forward(idx)[0], logits)


def test_chunked_loss_refuses_a_trainable_tied_head_in_one_line():
    model = full_gpt()  # everything trainable, wte too
    refusal = "'transformer.wte.weight' is trainable: set loss_chunk_rows = None"
    with pytest.raises(ValueError, match=refusal):  # the switch, before any step
        model.set_activation_memory(loss_chunk_rows=4)
    assert model.loss_chunk_rows is None
    model.loss_chunk_rows = 4  # set past the switch: the forward refuses the same way
    with pytest.raises(ValueError, match=refusal):
        model.forward(*batch())


def peak_step_bytes(model, idx, targets) -> int:
    tracemalloc.start()  # NumPy reports its buffers to tracemalloc
    tracemalloc.reset_peak()
    _, loss, cache = model.forward(idx, targets, dropout_rng=np.random.default_rng(0))
    model.backward(cache)
    del cache
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_each_switch_lowers_the_peak_by_what_it_drops():
    config = GPTConfig(n_layer=6, n_head=4, n_embd=32, block_size=64, vocab_size=512, dropout=0.1)
    idx, targets = batch(B=4, T=64, vocab=config.vocab_size)
    N = idx.size
    peaks = {}
    for name, checkpointing, chunk in [
        ("plain", False, None),
        ("checkpoint", True, None),
        ("chunk", False, 32),
    ]:
        model = lora_gpt(np.float32, config=config)
        model.set_activation_memory(checkpointing, chunk)
        peaks[name] = peak_step_bytes(model, idx, targets)
    logits_bytes = N * config.vocab_size * 4  # float32 (N, V): 1 MiB here
    # the plain step holds the logits and their probabilities (2 x 1 MiB) at the loss; chunks of 32 rows
    # hold 1/8 of that: at least one logits-sized array is saved
    assert peaks["plain"] - peaks["chunk"] > logits_bytes
    # six blocks' activations (attention probabilities and their dropout masks, the MLP's) against one
    # block's plus six inputs: at least four blocks' attention probabilities and inputs are saved
    block_input = N * config.n_embd * 4
    attention_probs = 4 * config.n_head * 64 * 64 * 4
    assert peaks["plain"] - peaks["checkpoint"] > 4 * (attention_probs + block_input)
