"""Loss masks: targets equal to IGNORE are not scored, and the mean is over the scored targets of a whole step.

The masked cross-entropy is checked against finite differences and against a log-softmax computed
here; with masks that differ from micro-batch to micro-batch, N micro-batches (or threads, or MPI
ranks) still make the step of one batch to 1e-12 in float64, and a mean per micro-batch would not.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_grad_accumulation import STEPS, assert_same_parameters, lora_models

from minilora.fast.cpu.ops import CPU_OPS
from minilora.gradcheck import check_layer, check_model
from minilora.layers import IGNORE, cross_entropy_backward, cross_entropy_forward
from minilora.training.evaluate import loss_in_bits_per_byte
from minilora.training.step import TrainingStep, forward_backward


def masked_targets(rng, shape, vocab, scored_share=0.4):
    """Random targets with about 1 - scored_share of them IGNORE."""
    targets = rng.integers(0, vocab, shape)
    return np.where(rng.random(shape) < scored_share, targets, IGNORE)


def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_the_loss_is_the_mean_over_the_scored_targets_alone():
    rng = np.random.default_rng(0)
    logits, targets = rng.standard_normal((3, 5, 7)), masked_targets(rng, (3, 5), 7)
    scored = targets != IGNORE
    expected = -log_softmax(logits)[scored, targets[scored]].mean()  # only the scored rows, by hand
    loss, _ = cross_entropy_forward(logits, targets)
    assert float(loss) == pytest.approx(expected, rel=1e-13)
    changed = logits.copy()
    changed[~scored] += 5 * rng.standard_normal((int((~scored).sum()), 7))  # logits of unscored positions
    assert float(cross_entropy_forward(changed, targets)[0]) == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("ops", ["reference", "cpu"])
def test_the_masked_backward_matches_finite_differences(ops):
    forward, backward = (
        (cross_entropy_forward, cross_entropy_backward)
        if ops == "reference"
        else (CPU_OPS.cross_entropy_forward, CPU_OPS.cross_entropy_backward)
    )
    rng = np.random.default_rng(1)
    inputs = {"logits": 3 * rng.standard_normal((4, 6, 9)), "targets": masked_targets(rng, (4, 6), 9)}
    check_layer(forward, backward, inputs, ("logits",), seed=2).assert_ok(1e-7)
    dlogits = backward(1.0, forward(**inputs)[1])
    unscored = inputs["targets"] == IGNORE
    assert np.all(dlogits[unscored] == 0) and np.abs(dlogits[~unscored]).sum() > 0


def test_a_batch_with_nothing_scored_has_loss_zero_and_no_gradient():
    logits = np.random.default_rng(2).standard_normal((2, 3, 5))
    loss, cache = cross_entropy_forward(logits, np.full((2, 3), IGNORE))
    assert float(loss) == 0.0 and not cross_entropy_backward(1.0, cache).any()


def masked_batch(rows: int, seed: int):
    """Rows whose scored share differs a lot from row to row: a per-micro-batch mean is then wrong."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (rows, 16))
    shares = np.linspace(0.05, 0.9, rows)[:, None]  # row r scores about shares[r] of its targets
    y = np.where(rng.random((rows, 16)) < shares, rng.integers(0, 256, (rows, 16)), IGNORE)
    y[:, -1] = rng.integers(0, 256, rows)  # every row scores at least one target
    return x, y


@pytest.mark.parametrize("kind", list(STEPS))
@pytest.mark.parametrize("n, rows", [(2, 8), (3, 7)])
def test_masked_micro_batches_equal_one_batch(kind, n, rows):
    models, optimizers = lora_models(2)
    for step_index in range(3):
        x, y = masked_batch(rows, seed=step_index)
        loss_one = STEPS[kind](1)(models[0], optimizers[0], x, y, None, 0.5)
        loss_n = STEPS[kind](n)(models[1], optimizers[1], x, y, None, 0.5)
        assert float(loss_n) == pytest.approx(float(loss_one), rel=1e-12)
        assert_same_parameters(models[0], models[1])


def test_a_mean_per_micro_batch_would_not_be_the_batchs_loss_or_gradient():
    model = lora_models(1)[0][0]
    x, y = masked_batch(8, seed=5)
    loss, grads = TrainingStep(grad_accum=2).accumulate(model, x, y)
    whole_loss, whole = forward_backward(model, x, y)

    def rows_weighted(model, x, y, dropout_key=None, dloss=1.0, positions=None):
        return forward_backward(model, x, y, dloss=0.5)  # each half's own mean, weighted by its rows

    _, naive = TrainingStep(rows_weighted, grad_accum=2).accumulate(model, x, y)
    name = "transformer.h.0.attn.c_attn.lora_B"
    np.testing.assert_allclose(grads[name], whole[name], rtol=1e-11, atol=1e-14)
    assert float(loss) == pytest.approx(float(whole_loss), rel=1e-12)
    halves_mean = 0.5 * sum(float(model.forward(x[r : r + 4], y[r : r + 4])[1]) for r in (0, 4))
    assert abs(halves_mean - float(whole_loss)) > 1e-3 * float(whole_loss)  # the mean of the halves' means
    assert np.abs(naive[name] - whole[name]).max() > 1e-3 * np.abs(whole[name]).max()


def test_a_model_with_masked_targets_passes_the_gradient_check():
    model = lora_models(1)[0][0]
    x, y = masked_batch(3, seed=7)
    check_model(model, x, y, n_samples=3).assert_ok(1e-6)


def test_ignore_is_the_only_out_of_range_target_allowed():
    model = lora_models(1)[0][0]
    x, y = masked_batch(2, seed=8)
    model.forward(x, y)  # IGNORE targets pass
    y[1, 3] = -1
    with pytest.raises(ValueError, match=r"targets holds token id -1 at position \(1, 3\)"):
        model.forward(x, y)
    with pytest.raises(ValueError, match="idx holds token id -100"):
        model.forward(np.full_like(x, IGNORE), y)


def test_bits_per_byte_of_a_batch_count_the_scored_targets_alone():
    y = np.array([[IGNORE, 3, IGNORE, 4]])
    token_bytes = np.array([1, 1, 1, 2, 5])
    # mean 1.5 nats over the two scored targets = 3 nats, over the 2 + 5 bytes they spell
    assert loss_in_bits_per_byte(1.5, y, token_bytes) == pytest.approx(3 / 7 / np.log(2))
    assert loss_in_bits_per_byte(1.5, y) == pytest.approx(1.5 / np.log(2))


def test_loss_chunks_weigh_each_chunk_by_its_scored_targets():
    # Chunks of 5 rows over 2 x 16 masked targets: a chunk's share is its count of scored ones, not 5/32.
    plain = lora_models(1)[0][0]
    chunked = lora_models(1)[0][0]
    chunked.set_activation_memory(loss_chunk_rows=5)
    x, y = masked_batch(2, seed=9)
    loss, grads = forward_backward(plain, x, y, dloss=1.3)
    chunked_loss, chunked_grads = forward_backward(chunked, x, y, dloss=1.3)
    assert float(chunked_loss) == pytest.approx(float(loss), rel=1e-12)
    for name in grads:
        np.testing.assert_allclose(chunked_grads[name], grads[name], rtol=1e-11, atol=1e-14, err_msg=name)
