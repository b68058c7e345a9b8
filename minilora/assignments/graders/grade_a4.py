"""Grader for a4: the whole model's backward.

The gradients come from the submission's model in its child process; the finite differences they
are checked against are taken of minilora's reference model here, with the same weights and the
same dropout masks, so a backward that matches a wrong forward of its own earns nothing.
"""

import numpy as np
import pytest

from minilora.assignments.sandbox import counted
from minilora.config import GPTConfig
from minilora.gradcheck import check_gradients
from minilora.model import GPT as ReferenceGPT
from minilora.model import init_params

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=7, dropout=0.1)
DROPOUT_SEED = 3


def params(seed=0):
    values = init_params(CONFIG, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for value in values.values():
        value += 0.1 * rng.standard_normal(value.shape)
    return values


def batch():
    rng = np.random.default_rng(5)
    return rng.integers(0, 7, (2, 5)), rng.integers(0, 7, (2, 5))


def student_model(student, frozen=()):
    """The submission's GPT in its child process, with the config made there too."""
    module = student["model"]
    return module.GPT(module.GPTConfig(**CONFIG.to_dict()), params(), frozen=list(frozen))


def student_gradients(model, dropout=True):
    idx, targets = batch()
    rng = np.random.default_rng(DROPOUT_SEED) if dropout else None
    return model.backward(model.forward(idx, targets, dropout_rng=rng)[2])


@pytest.mark.points(4)
def test_every_gradient_of_a_small_model_matches_finite_differences(student):
    grads = student_gradients(student_model(student))
    reference = ReferenceGPT(CONFIG, params())
    idx, targets = batch()

    def loss():  # the reference model's loss, with the masks the submission's forward drew
        return float(reference.forward(idx, targets, dropout_rng=np.random.default_rng(DROPOUT_SEED))[1])

    assert set(grads) == set(reference.params), "backward must return a gradient for every parameter"
    check_gradients(loss, reference.params, grads, mode="elementwise").assert_ok(1e-5)


@pytest.mark.points(2)
def test_gradients_equal_the_reference_on_a_fixed_input(student):
    grads = student_gradients(student_model(student), dropout=False)
    reference = ReferenceGPT(CONFIG, params())
    idx, targets = batch()
    expected = reference.backward(reference.forward(idx, targets)[2])
    assert set(grads) == set(expected)
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.points(1)
def test_frozen_parameters_get_no_gradients(student):
    frozen = [name for name in params() if not name.startswith("transformer.h.1.")]
    grads = student_gradients(student_model(student, frozen))
    assert set(grads) == {name for name in params() if name.startswith("transformer.h.1.")}


@pytest.mark.points(1)
def test_a_frozen_head_and_frozen_weights_get_no_weight_gradient_product(student):
    """LoRA's saving: a frozen weight passes gradient to its input, but its (C_in, C_out) product is never made."""
    frozen = [
        name for name in params() if not name.startswith("transformer.h.1.")
    ]  # wte and its tied head too
    model = student_model(student, frozen)
    idx, targets = batch()
    _, products = counted(model.backward, model.forward(idx, targets)[2])
    outputs = [tuple(out) for _, _, out in products]
    C, V = CONFIG.n_embd, CONFIG.vocab_size
    assert outputs.count((C, V)) == 0, "the frozen tied head's weight gradient x^T dlogits was computed"
    weight_shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]
    made = sum(outputs.count(shape) for shape in weight_shapes)
    assert made == len(weight_shapes), f"{made} weight-gradient products; only block 1's four weights train"
