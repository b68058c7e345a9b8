"""Grader for a4: the whole model's backward."""

import numpy as np
import pytest

from minilora.backend import count_matmuls
from minilora.config import GPTConfig
from minilora.gradcheck import check_model
from minilora.model import GPT as ReferenceGPT
from minilora.model import init_params

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=7, dropout=0.1)


def params(seed=0):
    values = init_params(CONFIG, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for value in values.values():
        value += 0.1 * rng.standard_normal(value.shape)
    return values


def batch():
    rng = np.random.default_rng(5)
    return rng.integers(0, 7, (2, 5)), rng.integers(0, 7, (2, 5))


@pytest.mark.points(4)
def test_every_gradient_of_a_small_model_matches_finite_differences(student):
    model = student["model"].GPT(CONFIG, params())
    idx, targets = batch()
    check_model(model, idx, targets, mode="elementwise", dropout_seed=3).assert_ok(1e-5)


@pytest.mark.points(2)
def test_gradients_equal_the_reference_on_a_fixed_input(student):
    idx, targets = batch()
    ours = student["model"].GPT(CONFIG, params())
    reference = ReferenceGPT(CONFIG, params())
    grads = ours.backward(ours.forward(idx, targets)[2])
    expected = reference.backward(reference.forward(idx, targets)[2])
    assert set(grads) == set(expected)
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.points(1)
def test_frozen_parameters_get_no_gradients(student):
    frozen = [name for name in params() if not name.startswith("transformer.h.1.")]
    model = student["model"].GPT(CONFIG, params(), frozen=frozen)
    idx, targets = batch()
    grads = model.backward(model.forward(idx, targets)[2])
    assert set(grads) == {name for name in params() if name.startswith("transformer.h.1.")}


@pytest.mark.points(1)
def test_a_frozen_head_and_frozen_weights_get_no_weight_gradient_product(student):
    """LoRA's saving: a frozen weight passes gradient to its input, but its (C_in, C_out) product is never made."""
    frozen = [
        name for name in params() if not name.startswith("transformer.h.1.")
    ]  # wte and its tied head too
    model = student["model"].GPT(CONFIG, params(), frozen=frozen)
    idx, targets = batch()
    _, _, cache = model.forward(idx, targets)
    with count_matmuls() as log:
        model.backward(cache)
    C, V = CONFIG.n_embd, CONFIG.vocab_size
    assert log.outputs_of_shape((C, V)) == 0, (
        "the frozen tied head's weight gradient x^T dlogits was computed"
    )
    weight_shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]
    made = sum(log.outputs_of_shape(shape) for shape in weight_shapes)
    assert made == len(weight_shapes), f"{made} weight-gradient products; only block 1's four weights train"
