"""Grader for a4: the whole model's backward.

The gradients come from the submission's model in its child process; the finite differences they
are checked against are taken of minilora's reference model here, with the same weights and the
same dropout masks, so a backward that matches a wrong forward of its own earns nothing. Every part
draws its weights, its batch, its dropout seed and its loss gradient from the part's ``rng``: no
table of gradients made offline for one fixed model can score.
"""

from typing import NamedTuple

import numpy as np
import pytest

from minilora.assignments.sandbox import counted
from minilora.config import GPTConfig
from minilora.gradcheck import check_gradients, relative_error
from minilora.model import GPT as ReferenceGPT
from minilora.model import init_params

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=7, dropout=0.1)
B, T = 2, 5  # T < block_size: wpe's last row gets no gradient
FLOAT32_TOL = 1e-4  # relative error of float32 gradients against the float64 reference's


class Case(NamedTuple):
    """One part's model and batch, all drawn from the part's rng."""

    params: dict  # name -> float64 array, GPT-2's init moved away from it
    idx: np.ndarray  # (B, T) token ids
    targets: np.ndarray  # (B, T) next-token targets
    dropout_seed: int  # the masks of every forward in the part come from a generator seeded so

    def dropout_rng(self):
        """A fresh generator: each forward given one draws the same masks."""
        return np.random.default_rng(self.dropout_seed)


def draw_case(rng) -> Case:
    """Weights off GPT-2's init (unit gains and zero biases hide mistakes), a batch and a dropout seed."""
    params = init_params(CONFIG, seed=int(rng.integers(2**31)), dtype=np.float64)
    for value in params.values():
        value += 0.1 * rng.standard_normal(value.shape)
    idx, targets = rng.integers(0, CONFIG.vocab_size, (2, B, T))
    return Case(params, idx, targets, int(rng.integers(2**31)))


def draw_dloss(rng) -> float:
    """A loss gradient far from 1, as a data-parallel or accumulation step passes (its shard's weight)."""
    return float(rng.uniform(1.5, 4.0))


def student_model(student, params, frozen=()):
    """The submission's GPT in its child process, with the config made there and the weights sent from here."""
    module = student["model"]
    return module.GPT(module.GPTConfig(**CONFIG.to_dict()), params, frozen=list(frozen))


def student_gradients(model, case: Case, dropout=True, dloss=1.0):
    rng = case.dropout_rng() if dropout else None
    return model.backward(model.forward(case.idx, case.targets, dropout_rng=rng)[2], dloss=dloss)


def reference_gradients(case: Case, dropout=True, dloss=1.0):
    """The reference model's gradients here, in float64, with the masks the submission's forward drew."""
    reference = ReferenceGPT(CONFIG, {name: value.astype(np.float64) for name, value in case.params.items()})
    rng = case.dropout_rng() if dropout else None
    return reference.backward(reference.forward(case.idx, case.targets, dropout_rng=rng)[2], dloss=dloss)


@pytest.mark.points(4)
def test_every_gradient_of_a_small_model_matches_finite_differences(student, rng):
    case = draw_case(rng)
    grads = student_gradients(student_model(student, case.params), case)
    reference = ReferenceGPT(CONFIG, {name: value.copy() for name, value in case.params.items()})

    def loss():  # the reference model's loss, with the masks the submission's forward drew
        return float(reference.forward(case.idx, case.targets, dropout_rng=case.dropout_rng())[1])

    assert set(grads) == set(reference.params), "backward must return a gradient for every parameter"
    check_gradients(loss, reference.params, grads, mode="elementwise").assert_ok(1e-5)


@pytest.mark.points(2)
def test_gradients_equal_the_reference_without_dropout(student, rng):
    case = draw_case(rng)
    grads = student_gradients(student_model(student, case.params), case, dropout=False)
    expected = reference_gradients(case, dropout=False)
    assert set(grads) == set(expected)
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.points(1)
def test_backward_scales_every_gradient_by_dloss(student, rng):
    """Data-parallel and accumulation steps call backward(cache, dloss=w): each gradient is w times dL/dp."""
    case, dloss = draw_case(rng), draw_dloss(rng)
    grads = student_gradients(student_model(student, case.params), case, dloss=dloss)
    expected = reference_gradients(case)  # at dloss = 1
    assert set(grads) == set(expected)
    for name in expected:
        np.testing.assert_allclose(
            grads[name], dloss * expected[name], rtol=1e-9, atol=1e-12, err_msg=f"{name} at dloss={dloss:.3f}"
        )


@pytest.mark.points(1)
def test_a_float32_model_gets_float32_gradients(student, rng):
    """float32 weights in, float32 gradients out: a float64 gradient doubles the optimiser's memory and time."""
    case, dloss = draw_case(rng), draw_dloss(rng)
    case = case._replace(params={name: value.astype(np.float32) for name, value in case.params.items()})
    grads = student_gradients(student_model(student, case.params), case, dloss=dloss)
    leaked = sorted(name for name, grad in grads.items() if grad.dtype != np.float32)
    assert not leaked, f"float32 weights, but the gradients of {leaked} are not float32"
    expected = reference_gradients(case, dloss=dloss)  # in float64, of the same float32 values
    assert set(grads) == set(expected)
    for name in expected:
        error = relative_error(grads[name].astype(np.float64), expected[name])
        assert error <= FLOAT32_TOL, f"{name}: relative error {error:.2e} against the float64 reference"


@pytest.mark.points(1)
def test_frozen_parameters_get_no_gradients(student, rng):
    case = draw_case(rng)
    trained = {name for name in case.params if name.startswith("transformer.h.1.")}
    grads = student_gradients(student_model(student, case.params, set(case.params) - trained), case)
    assert set(grads) == trained


@pytest.mark.points(1)
def test_a_frozen_head_and_frozen_weights_get_no_weight_gradient_product(student, rng):
    """LoRA's saving: a frozen weight passes gradient to its input, but its (C_in, C_out) product is never made."""
    case = draw_case(rng)
    frozen = [
        name for name in case.params if not name.startswith("transformer.h.1.")
    ]  # wte, its tied head too
    model = student_model(student, case.params, frozen)
    _, products = counted(model.backward, model.forward(case.idx, case.targets)[2])
    outputs = [tuple(out) for _, _, out in products]
    C, V = CONFIG.n_embd, CONFIG.vocab_size
    assert outputs.count((C, V)) == 0, "the frozen tied head's weight gradient x^T dlogits was computed"
    weight_shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]
    made = sum(outputs.count(shape) for shape in weight_shapes)
    assert made == len(weight_shapes), f"{made} weight-gradient products; only block 1's four weights train"
