"""Gradient accumulation: N micro-batches make the step one batch N times as large makes, on every CPU step.

Accumulation lives once, in ``training.step.TrainingStep``, for any pair of halves. In float64 the
parameters after a step with grad_accum = N equal those after the one-piece step on the same rows
to 1e-12, for the reference halves, the CPU threads' first half and the MPI step (one rank), and a
whole ``train_loop`` run with --grad-accum N equals the run with an N times larger batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from minilora.config import get_preset
from minilora.fast.cpu.sharded_step import sharded_train_step
from minilora.fast.distributed.mpi_step import MpiStep
from minilora.fast.distributed.world import World
from minilora.io.data import Corpus
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.optim import AdamW
from minilora.training.loop import TrainSettings, train_loop
from minilora.training.step import TrainingStep, split_bounds

CONFIG = get_preset("tiny", block_size=16)


def lora_models(n: int):
    models = []
    for _ in range(n):
        base = GPT(CONFIG, init_params(CONFIG, seed=3, dtype=np.float64))
        # No trained biases: the key third of c_attn.bias has an exactly-zero gradient (q . b_k shifts
        # a whole row of scores), which AdamW would blow up from rounding noise to steps of size lr.
        models.append(add_lora(base, LoraConfig(r=4, target_modules="all-linear", init="random")))
    optimizers = [
        AdamW(m.params, m.trainable_names, lr=1e-2, weight_decay=0.1, no_decay=m.no_decay) for m in models
    ]
    return models, optimizers


def batch(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (rows, 16)), rng.integers(0, 256, (rows, 16))


def assert_same_parameters(a, b, tol=1e-12):
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=tol, atol=tol, err_msg=name)


STEPS = {
    "reference": lambda n: TrainingStep(grad_accum=n),
    "threads": lambda n: sharded_train_step(shards=2, grad_accum=n),
    "mpi, one rank": lambda n: MpiStep(World(0, 1), lora_models(1)[0][0].trainable_names, grad_accum=n),
}


@pytest.mark.parametrize("kind", list(STEPS))
@pytest.mark.parametrize("n, rows", [(2, 8), (4, 8), (3, 7)])
def test_n_micro_batches_equal_one_batch_n_times_as_large(kind, n, rows):
    models, optimizers = lora_models(2)
    for step_index in range(3):  # several steps: the optimiser state follows too
        x, y = batch(rows, seed=step_index)
        loss_one = STEPS[kind](1)(models[0], optimizers[0], x, y, None, 0.5)
        loss_n = STEPS[kind](n)(models[1], optimizers[1], x, y, None, 0.5)
        assert float(loss_n) == pytest.approx(float(loss_one), rel=1e-12)
        assert_same_parameters(models[0], models[1])


def test_a_per_micro_batch_mean_would_not_be_the_big_batchs_gradient():
    # Seeding each micro-batch's backward with 1 (its own mean) instead of B_k / B gives N times the
    # gradient: the weighting is what makes accumulation exact.
    models, _ = lora_models(1)
    model = models[0]
    x, y = batch(8)
    step = TrainingStep(grad_accum=2)
    _, weighted = step.accumulate(model, x, y)

    def unweighted(model, x, y, dropout_key=None, dloss=1.0, positions=None):
        loss, cache = model.forward(x, y)[1:]
        return loss, model.backward(cache, 1.0)

    _, naive = TrainingStep(unweighted, grad_accum=2).accumulate(model, x, y)
    name = model.trainable_names[0]
    np.testing.assert_allclose(naive[name], 2 * weighted[name], rtol=1e-12)


def test_uneven_micro_batches_are_weighted_by_their_rows():
    assert split_bounds(7, 3) == [(0, 2), (2, 5), (5, 7)]  # rows 2, 3, 2: weights 2/7, 3/7, 2/7
    with pytest.raises(ValueError, match="cannot be cut into grad_accum=4"):
        TrainingStep(grad_accum=4).accumulate(lora_models(1)[0][0], *batch(3))
    with pytest.raises(ValueError, match="grad_accum must be a positive integer"):
        TrainingStep(grad_accum=0)


def test_a_run_with_grad_accum_equals_the_run_with_the_larger_batch():
    rng = np.random.default_rng(7)
    corpus = Corpus(
        name="random",
        train=rng.integers(0, 256, 4000).astype(np.uint8),
        val=rng.integers(0, 256, 800).astype(np.uint8),
    )
    runs = []
    for batch_size, grad_accum in ((8, 1), (4, 2), (2, 4)):
        models, optimizers = lora_models(1)
        settings = TrainSettings(
            steps=4,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=1e-2,
            warmup_steps=1,
            eval_interval=4,
            eval_windows=2,
        )
        result = train_loop(models[0], optimizers[0], corpus, settings, progress=False, report=False)
        runs.append((models[0], result))
    for model, result in runs[1:]:
        assert_same_parameters(runs[0][0], model)
        assert [p["loss"] for p in result.losses] == pytest.approx(
            [p["loss"] for p in runs[0][1].losses], rel=1e-12
        )
