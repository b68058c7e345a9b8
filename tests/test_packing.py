"""Packing: several examples in one row, each attending only to itself, with positions restarting per example.

Layer by layer (the reference attention, grouped-query attention, the NumPy flash attention, the
CPU fast path's attention and RoPE at each token's position) a packed row computes what its examples
compute each in a row of its own; then whole steps of both families, packed, equal the padded step
on the same examples to 1e-12 in float64, for the reference layers and the CPU fast path.
"""

from __future__ import annotations

import numpy as np
import pytest

from minilora.config import GPTConfig
from minilora.fast.cpu import llama_ops
from minilora.fast.cpu.ops import CPU_OPS
from minilora.gradcheck import check_layer, check_model
from minilora.layers import IGNORE, rope_forward, rope_tables, rope_tables_at
from minilora.layers.attention import attention_backward, attention_forward, scaled_dot_product_attention
from minilora.layers.flash_attention import flash_attention_backward, flash_attention_forward, tiles
from minilora.layers.gqa_attention import gqa_attention_backward, gqa_attention_forward
from minilora.llama import Llama, LlamaConfig, init_llama_params
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.training.examples import PAD, Example, ExampleSet, pack_rows, packed_batch, padded_batch
from minilora.training.step import forward_backward

LENGTHS = [[4, 7], [3, 3, 5]]  # two rows of T = 11: two examples, then three
T = 11


def starts_of(lengths_per_row):
    """(B, T) the position where each token's example starts, for rows of examples of these lengths."""
    starts = np.zeros((len(lengths_per_row), T), dtype=np.int64)
    for b, lengths in enumerate(lengths_per_row):
        offset = 0
        for length in lengths:
            starts[b, offset : offset + length] = offset
            offset += length
    return starts


def spans():
    """(row, start, stop) of every example of LENGTHS."""
    for b, lengths in enumerate(LENGTHS):
        offsets = np.cumsum([0, *lengths])
        for start, stop in zip(offsets[:-1], offsets[1:]):
            yield b, int(start), int(stop)


@pytest.mark.parametrize("kind", ["reference", "flash block 3", "flash block 64", "cpu"])
def test_a_packed_row_attends_as_its_examples_do_alone(kind):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, T, 4)) for _ in range(3))
    starts = starts_of(LENGTHS)
    if kind == "reference":
        y = scaled_dot_product_attention(q, k, v, None, starts)[0]
    elif kind == "cpu":
        y = llama_ops.gqa_attention_forward(q, k, v, None, starts)[0]
    else:
        y = flash_attention_forward(q, k, v, int(kind.split()[-1]), starts)[0]
    for b, start, stop in spans():
        part = (x[b : b + 1, :, start:stop] for x in (q, k, v))
        alone = scaled_dot_product_attention(*part)[0]  # the example in a row of its own, plain causal
        np.testing.assert_allclose(y[b : b + 1, :, start:stop], alone, rtol=1e-12, atol=1e-14)


def test_packed_attention_backwards_match_finite_differences():
    rng = np.random.default_rng(1)
    starts = starts_of(LENGTHS)
    qkv = {"qkv": rng.standard_normal((2, T, 3 * 8))}
    check_layer(
        lambda qkv: attention_forward(qkv, 2, None, starts), attention_backward, qkv, ("qkv",), seed=3
    ).assert_ok(1e-7)
    check_layer(
        lambda qkv: CPU_OPS.attention_forward(qkv, 2, None, starts), CPU_OPS.attention_backward, qkv, ("qkv",)
    ).assert_ok(1e-7)
    heads = {"q": rng.standard_normal((2, 4, T, 4)), "k": rng.standard_normal((2, 2, T, 4))}
    heads["v"] = rng.standard_normal((2, 2, T, 4))
    for forward, backward in (
        (gqa_attention_forward, gqa_attention_backward),
        (llama_ops.gqa_attention_forward, llama_ops.gqa_attention_backward),
    ):
        check_layer(
            lambda q, k, v, f=forward: f(q, k, v, None, starts), backward, heads, ("q", "k", "v"), seed=4
        ).assert_ok(1e-7)


@pytest.mark.parametrize("block", [2, 3, 64])
def test_the_packed_flash_backward_equals_the_reference_backward(block):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 2, T, 4)) for _ in range(3))
    starts = starts_of(LENGTHS)
    dout = rng.standard_normal(q.shape)
    _, reference = gqa_attention_forward(q, k, v, None, starts)
    expected = gqa_attention_backward(dout, reference)
    _, flash = flash_attention_forward(q, k, v, block, starts)
    for got, want in zip(flash_attention_backward(dout, flash), expected):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)


def test_flash_skips_every_tile_no_query_of_any_row_sees():
    # Rows of examples of 2 tokens: key tile [4, 6) is seen by queries 4 and 5 alone.
    starts = np.repeat(np.arange(0, 12, 2), 2)[None]  # (1, 12): 0 0 2 2 4 4 ...
    assert tiles(12, 2, starts) == [(s, s + 2, s + 2) for s in range(0, 12, 2)]
    assert tiles(12, 4, None) == [(0, 4, 12), (4, 8, 12), (8, 12, 12)]


def test_rope_at_each_tokens_position_rotates_each_example_from_zero():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, T, 8))
    positions = np.arange(T) - starts_of(LENGTHS)  # (2, T), 0.. within every example
    cos, sin = rope_tables_at(positions, 8, 10000.0, np.float64)
    rotated = rope_forward(x, cos, sin)[0]
    for b, start, stop in spans():
        alone = rope_forward(
            x[b : b + 1, :, start:stop], *rope_tables(stop - start, 8, 0, 10000.0, np.float64, np)
        )
        np.testing.assert_allclose(rotated[b : b + 1, :, start:stop], alone[0], rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="RoPE tables have shape"):
        rope_forward(x, cos[:1], sin[:1])  # one row's tables for two rows


def example(ids, trained):
    return Example(np.asarray(ids), np.asarray(trained, dtype=bool))


def test_padded_and_packed_batches_hold_the_examples_and_mask_the_rest():
    a = example([5, 6, 7, 8], [0, 0, 1, 1])  # inputs 5 6 7, targets 6 (not trained) 7 8
    b = example([9, 10, 11], [0, 1, 1])
    padded = padded_batch([a, b], 5)
    assert padded.positions is None
    assert padded.x.tolist() == [[5, 6, 7, PAD, PAD], [9, 10, PAD, PAD, PAD]]
    assert padded.y.tolist() == [[IGNORE, 7, 8, IGNORE, IGNORE], [10, 11, IGNORE, IGNORE, IGNORE]]
    packed = packed_batch([a, b], pack_rows([3, 2], 5), 5)
    assert packed.x.tolist() == [[5, 6, 7, 9, 10]]
    assert packed.y.tolist() == [[IGNORE, 7, 8, 10, 11]]
    assert packed.positions.tolist() == [[0, 1, 2, 0, 1]]


def test_pack_rows_fills_each_row_in_order_and_stops_before_one_row_too_many():
    assert pack_rows([3, 2, 4, 1, 5], 5) == [[0, 1], [2, 3], [4]]
    assert pack_rows([3, 2, 4, 1, 5], 5, rows=2) == [[0, 1], [2, 3]]


def test_a_long_example_is_cut_to_the_row_and_packing_draws_enough_to_fill_every_row():
    long = example(list(range(1, 30)), [1] * 29)
    assert padded_batch([long], 8).y.tolist() == [list(range(2, 10))]
    short = example([1, 2, 3], [0, 1, 1])
    batch = ExampleSet([short, long], packing=True).train_batch(4, 8, np.random.default_rng(0))
    assert batch.x.shape == (4, 8) and (batch.positions == 0).sum() >= 4
    used = (batch.y != IGNORE).sum(axis=1)
    assert used.min() >= 2  # no row is left empty


def models_of_both_families():
    """A full GPT (wpe trains: its packed gradient is the lookup's), a LoRA GPT and a full Llama, float64."""
    gpt_config = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=40)
    gpt = GPT(gpt_config, init_params(gpt_config, seed=1, dtype=np.float64))
    lora_gpt = add_lora(
        GPT(gpt_config, init_params(gpt_config, seed=1, dtype=np.float64)), LoraConfig(r=2, init="random")
    )
    llama_config = LlamaConfig(
        n_layer=2, n_head=4, n_kv_head=2, n_embd=16, ffn_hidden=24, vocab_size=40, block_size=12
    )
    llama = Llama(llama_config, init_llama_params(llama_config, seed=2, dtype=np.float64))
    return {"gpt": gpt, "lora gpt": lora_gpt, "llama": llama}


def random_examples(seed=5, n=5):
    rng = np.random.default_rng(seed)
    examples = []
    for length in rng.integers(3, 9, n):
        trained = rng.random(length) < 0.6
        trained[-1] = True
        examples.append(example(rng.integers(0, 40, length), trained))
    return examples


@pytest.mark.parametrize("ops", ["reference", "cpu"])
@pytest.mark.parametrize("family", ["gpt", "lora gpt", "llama"])
def test_the_packed_step_equals_the_padded_step(family, ops):
    model = models_of_both_families()[family]
    if ops == "cpu":
        model.use_layer_ops(CPU_OPS)
    examples = random_examples()
    padded = padded_batch(examples, 12)
    packed = packed_batch(examples, pack_rows([len(e.ids) - 1 for e in examples], 12), 12)
    assert packed.x.shape[0] < padded.x.shape[0]  # the point of packing: fewer rows
    loss_padded, grads_padded = forward_backward(model, padded.x, padded.y)
    loss_packed, grads_packed = forward_backward(model, packed.x, packed.y, positions=packed.positions)
    assert float(loss_packed) == pytest.approx(float(loss_padded), rel=1e-12)
    assert list(grads_packed) == list(grads_padded)
    for name in grads_padded:
        np.testing.assert_allclose(
            grads_packed[name], grads_padded[name], rtol=1e-10, atol=1e-13, err_msg=name
        )


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_without_its_positions_a_packed_row_would_not_be_its_examples(family):
    model = models_of_both_families()[family]
    examples = random_examples()
    padded = padded_batch(examples, 12)
    packed = packed_batch(examples, pack_rows([len(e.ids) - 1 for e in examples], 12), 12)
    loss_padded = float(model.forward(padded.x, padded.y)[1])
    assert abs(float(model.forward(packed.x, packed.y)[1]) - loss_padded) > 1e-4  # examples see each other


def test_a_packed_gpt_step_passes_the_gradient_check():
    model = models_of_both_families()["gpt"]
    examples = random_examples(seed=6, n=4)
    packed = packed_batch(examples, pack_rows([len(e.ids) - 1 for e in examples], 12), 12)
    objective_model = model

    class Packed:  # the model with the batch's positions bound, for check_model's plain forward calls
        params, trainable_names = objective_model.params, objective_model.trainable_names

        def forward(self, idx, targets, dropout_rng=None):
            return objective_model.forward(idx, targets, dropout_rng, positions=packed.positions)

        def backward(self, cache):
            return objective_model.backward(cache)

    check_model(Packed(), packed.x, packed.y, n_samples=3).assert_ok(1e-6)


def test_positions_that_do_not_count_within_examples_are_refused():
    model = models_of_both_families()["llama"]
    x = np.zeros((2, 5), dtype=np.int64)
    bad = np.array([[0, 1, 2, 0, 1], [0, 1, 3, 4, 5]])
    with pytest.raises(ValueError, match="row 1 has 3 at column 2, after 1"):
        model.forward(x, x, positions=bad)
    with pytest.raises(ValueError, match=r"positions have shape \(2, 4\)"):
        model.forward(x, x, positions=bad[:, :4])
