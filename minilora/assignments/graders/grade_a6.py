"""Grader for a6: AdamW, gradient clipping, the warmup-cosine schedule, and a tiny GPT trained with them.

The optimiser works in place, so its parts reach it through the release's train_tiny.py, which runs
the submission's optim.py on copies of the parameters and hands the results back; the gradients go
to the step as sent, so a step that writes into them fails the sandbox's argument check. Its
numbers are checked against the update written out here in float64, in the textbook form
(bias-corrected moments, the decay as a multiplication of its own, each parameter at its own
lr_scale), and the schedule against its formula. Every function has a float32 part: float32 in,
float32 out, and a rate that is a Python float, so that NumPy 2 never promotes an update to float64.

The training part runs train_tiny.py's tiny GPT with the submission's optimiser (and with whichever
of the student's a1-a3 files lie beside it), takes the trained parameters back, and measures their
loss here, with minilora's reference model, on held-out sequences drawn here: nothing the child
reports about its own loss counts. That loss must fall to within a margin of minilora's own run on
the same seed, made here: a step that never learns stays near ln V and scores nothing there.
"""

import math

import numpy as np
import pytest

from minilora.assignments import train_tiny
from minilora.model import WTE, init_params

MARGIN = 0.75  # a run's held-out loss must fall at least (1 - MARGIN) of the way the reference's falls
RUNS = 5  # training runs, each on its own seed; a majority of them must pass


def adamw_written_out(p, grads, lrs, betas, eps, weight_decay, decayed, lr_scale=1.0):
    """AdamW on one parameter in float64, step by step: the parameter after each step.

    ``lr_scale`` multiplies this parameter's rate everywhere, the decay included (LoRA+'s lora_B).
    """
    b1, b2 = betas
    m, v, after = np.zeros_like(p), np.zeros_like(p), []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        lr = lr * lr_scale
        if decayed:
            p = p * (1.0 - lr * weight_decay)  # decoupled: never through the gradient
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * g**2
        m_hat, v_hat = m / (1.0 - b1**t), v / (1.0 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        after.append(p)
    return after


def drawn_params(rng, dtype=np.float64):
    """A decayed matrix, an undecayed vector and the token embedding (2-D, but never decayed)."""
    return {
        "h.mlp.c_fc.weight": rng.standard_normal((4, 6)).astype(dtype),
        "h.mlp.c_fc.bias": rng.standard_normal(6).astype(dtype),
        WTE: rng.standard_normal((5, 4)).astype(dtype),
    }


def drawn_grads(rng, params, steps):
    """Gradients spread over six orders of magnitude, as real ones are."""
    return [
        {
            name: rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-3, 3, p.shape)
            for name, p in params.items()
        }
        for _ in range(steps)
    ]


def check_against_written_out(
    student, rng, weight_decay, steps=6, dtype=np.float64, rtol=1e-10, atol=1e-13, lr_scale=None
):
    """The submission's AdamW over ``steps`` steps against adamw_written_out, parameter by parameter."""
    lr_scale = lr_scale or {}
    params = drawn_params(rng, dtype)
    grad_steps = drawn_grads(rng, params, steps)
    grad_steps = [{name: g.astype(dtype) for name, g in grads.items()} for grads in grad_steps]
    lrs = list(10.0 ** rng.uniform(-3, -1, steps))
    betas = (float(rng.uniform(0.8, 0.95)), float(rng.uniform(0.95, 0.999)))
    eps = float(10.0 ** rng.uniform(-8, -6))
    after = student["train_tiny"].adamw_steps(
        params, grad_steps, lrs, betas=betas, eps=eps, weight_decay=weight_decay, lr_scale=lr_scale
    )
    assert len(after) == steps
    decayed = {"h.mlp.c_fc.weight"}  # matrices, not vectors, not the embeddings
    for name, p in params.items():
        expected = adamw_written_out(
            p.astype(np.float64),
            [grads[name].astype(np.float64) for grads in grad_steps],
            lrs,
            betas,
            eps,
            weight_decay,
            name in decayed,
            lr_scale.get(name, 1.0),
        )
        for t in range(steps):
            got = after[t][name]
            assert got.dtype == dtype, f"{name} became {got.dtype} at step {t + 1}: float32 in, float32 out"
            np.testing.assert_allclose(
                got, expected[t], rtol=rtol, atol=atol, err_msg=f"{name} after step {t + 1}"
            )


@pytest.mark.points(1)
def test_adamw_first_step_moves_every_weight_by_lr_against_its_gradient(student, rng):
    """At t = 1 the bias-corrected moments are g and g^2: each weight moves by lr, whatever its gradient's size."""
    params = drawn_params(rng)
    (grads,) = drawn_grads(rng, params, 1)
    lr = float(10.0 ** rng.uniform(-3, -1))
    (after,) = student["train_tiny"].adamw_steps(params, [grads], [lr], eps=1e-12, weight_decay=0.0)
    for name, p in params.items():
        np.testing.assert_allclose(after[name] - p, -lr * np.sign(grads[name]), rtol=1e-4, err_msg=name)


@pytest.mark.points(3)
def test_adamw_matches_the_update_written_out(student, rng):
    check_against_written_out(student, rng, weight_decay=0.0)


@pytest.mark.points(2)
def test_adamw_decay_is_decoupled_and_only_for_matrices(student, rng):
    """Decay multiplies a matrix by (1 - lr wd) on its own; biases, gains and embeddings are never decayed."""
    check_against_written_out(student, rng, weight_decay=float(rng.uniform(0.5, 2.0)))


@pytest.mark.points(2)
def test_adamw_gives_each_parameter_its_lr_scale(student, rng):
    """LoRA+ trains lora_B at a multiple of lora_A's rate: lr_p = lr * lr_scale, in the step and in the decay."""
    lr_scale = {
        "h.mlp.c_fc.weight": float(rng.uniform(2.0, 16.0)),
        "h.mlp.c_fc.bias": float(rng.uniform(0.1, 0.5)),
    }
    check_against_written_out(student, rng, weight_decay=float(rng.uniform(0.5, 2.0)), lr_scale=lr_scale)


@pytest.mark.points(1)
def test_adamw_keeps_float32(student, rng):
    weight_decay = float(rng.uniform(0.05, 0.5))
    check_against_written_out(student, rng, weight_decay, dtype=np.float32, rtol=1e-5, atol=1e-5)


def global_norm(arrays):
    """The L2 norm of every element of every array, in float64, as one long vector."""
    return float(np.linalg.norm(np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])))


def drawn_gradient_dict(rng, scale=1.0, dtype=np.float64):
    return {
        "a.weight": (scale * rng.standard_normal((8, 5))).astype(dtype),
        "a.bias": (scale * rng.standard_normal(5)).astype(dtype),
        "b.weight": (scale * rng.standard_normal((3, 8))).astype(dtype),
    }


@pytest.mark.points(2)
def test_clip_grad_norm_scales_all_gradients_together_to_max_norm(student, rng):
    grads = drawn_gradient_dict(rng, scale=float(rng.uniform(2, 10)))
    norm = global_norm(grads.values())
    max_norm = float(rng.uniform(0.5, 2.0))
    clipped, returned = student["train_tiny"].clip_copies(grads, max_norm)
    assert float(returned) == pytest.approx(norm, rel=1e-12), "return the norm before clipping"
    for name, g in grads.items():
        np.testing.assert_allclose(clipped[name], g * (max_norm / (norm + 1e-6)), rtol=1e-12, err_msg=name)
    assert global_norm(clipped.values()) == pytest.approx(max_norm, rel=1e-5)


@pytest.mark.points(1)
def test_clip_grad_norm_leaves_gradients_within_the_limit_alone(student, rng):
    grads = drawn_gradient_dict(rng, scale=float(rng.uniform(0.05, 0.2)))
    norm = global_norm(grads.values())
    clipped, returned = student["train_tiny"].clip_copies(grads, norm * float(rng.uniform(1.5, 3.0)))
    assert float(returned) == pytest.approx(norm, rel=1e-12)
    for name, g in grads.items():
        np.testing.assert_allclose(clipped[name], g, rtol=1e-15, atol=0, err_msg=f"{name} was scaled")


@pytest.mark.points(1)
def test_clipping_large_float32_gradients(student, rng):
    """Gradients of norm near 1e5 in float32, as a diverging step makes them: clipped to max_norm, still float32.

    The norm comes back in float32 too: a float64 one is a sum over Python floats, a host round trip per tensor.
    """
    grads = drawn_gradient_dict(rng, scale=float(rng.uniform(5e3, 2e4)), dtype=np.float32)
    norm, max_norm = global_norm(grads.values()), float(rng.uniform(0.5, 2.0))
    clipped, returned = student["train_tiny"].clip_copies(grads, max_norm)
    assert all(g.dtype == np.float32 for g in clipped.values()), "float32 in, float32 out"
    assert returned.dtype == np.float32, f"the norm of float32 gradients came back {returned.dtype}"
    assert float(returned) == pytest.approx(norm, rel=1e-5)
    assert global_norm(clipped.values()) == pytest.approx(max_norm, rel=1e-5)


@pytest.mark.points(1)
def test_scale_to_norm_applies_one_factor_of_at_most_one(student, rng):
    arrays = [rng.standard_normal((4, 3)), rng.standard_normal(7).astype(np.float32)]
    norm = float(rng.uniform(2, 5))
    for max_norm in (float(rng.uniform(0.5, 1.5)), 2 * norm):
        scaled = student["train_tiny"].scale_copies(arrays, np.float64(norm), max_norm)
        factor = min(1.0, max_norm / (norm + 1e-6))
        for a, s in zip(arrays, scaled):
            assert s.dtype == a.dtype, "each array keeps its dtype"
            np.testing.assert_allclose(s, a * factor, rtol=1e-6 if a.dtype == np.float32 else 1e-12)


@pytest.mark.points(1)
def test_scale_to_norm_keeps_float32(student, rng):
    """float32 arrays and a float32 norm, as clip_grad_norm of float32 gradients hands it on: still float32."""
    arrays = [rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal(6).astype(np.float32)]
    norm, max_norm = np.float32(rng.uniform(2, 5)), float(rng.uniform(0.5, 1.5))
    scaled = student["train_tiny"].scale_copies(arrays, np.asarray(norm), max_norm)
    for a, s in zip(arrays, scaled):
        assert s.dtype == np.float32, f"float32 in, {s.dtype} out"
        np.testing.assert_allclose(s, a * (max_norm / (float(norm) + 1e-6)), rtol=1e-6)


def schedule_written_out(step, max_lr, total_steps, warmup_steps, min_lr):
    if step < warmup_steps:  # step 0 is the first step: max_lr / warmup_steps, rising to max_lr
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    angle = math.pi * (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * (math.cos(angle) + 1.0) / 2.0


@pytest.mark.points(2)
def test_cosine_lr_warms_up_then_decays_to_min_lr(student, rng):
    max_lr = float(10.0 ** rng.uniform(-4, -2))
    min_lr = float(max_lr * rng.uniform(0.0, 0.2))
    total, warmup = int(rng.integers(20, 60)), int(rng.integers(2, 10))
    schedule = student["optim"].cosine_lr
    for step in range(total + 3):
        expected = schedule_written_out(step, max_lr, total, warmup, min_lr)
        got = schedule(step, max_lr, total, warmup, min_lr)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-18), (
            f"step {step}: {got} instead of {expected}"
        )


@pytest.mark.points(1)
def test_cosine_lr_without_warmup_starts_at_max_lr_and_ends_at_min_lr(student, rng):
    max_lr, total = float(10.0 ** rng.uniform(-4, -2)), int(rng.integers(10, 40))
    min_lr = float(max_lr * rng.uniform(0.01, 0.2))
    schedule = student["optim"].cosine_lr
    rates = [schedule(step, max_lr, total, 0, min_lr) for step in range(total + 5)]
    assert rates[0] == pytest.approx(max_lr, rel=1e-12), "no warmup: the first step runs at max_lr"
    assert all(a >= b for a, b in zip(rates, rates[1:])), "the cosine only ever decreases"
    assert rates[total:] == pytest.approx([min_lr] * 5, rel=1e-12), "from total_steps on: min_lr"
    middle = schedule_written_out(total // 2, max_lr, total, 0, min_lr)
    assert rates[total // 2] == pytest.approx(middle, rel=1e-12)


@pytest.mark.points(1)
def test_cosine_lr_is_a_python_float_that_keeps_float32_updates_float32(student, rng):
    """A NumPy float64 rate (np.cos, np.sqrt of a float) would make every float32 update float64.

    train_tiny.rate_times multiplies in the child: a NumPy float64 crosses to here as a plain number.
    """
    max_lr, total = float(10.0 ** rng.uniform(-4, -2)), int(rng.integers(20, 60))
    warmup, min_lr = int(rng.integers(2, 10)), float(max_lr * rng.uniform(0.0, 0.2))
    update = rng.standard_normal(3).astype(np.float32)
    for step in range(total + 3):
        got = student["train_tiny"].rate_times(update, step, max_lr, total, warmup, min_lr)
        assert got.dtype == np.float32, f"step {step}: the rate made a float32 update {got.dtype}"
        expected = schedule_written_out(step, max_lr, total, warmup, min_lr) * update.astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-30, err_msg=f"step {step}")


def check_trained_params(params, start):
    """Every parameter of the tiny GPT, by name, in its shape, still float32: (name -> array)."""
    assert isinstance(params, dict) and sorted(params) == sorted(start), (
        "train_tiny_gpt must hand back the GPT's parameters by name"
    )
    for name, p in start.items():
        got = params[name]
        assert isinstance(got, np.ndarray) and got.shape == p.shape, (
            f"{name} came back as {type(got).__name__}"
        )
        assert got.dtype == np.float32, f"{name} became {got.dtype}: float32 in, float32 out"
    return params


def training_run(student, rng):
    """One run on a seed drawn here, measured here: (held-out loss before, reference's after, yours after, layers).

    The losses are minilora's reference model's on held-out sequences drawn here, for the start, for
    minilora's own run and for the parameters the submission's run hands back.
    """
    seed = int(rng.integers(2**31))
    x, y = train_tiny.counting_batch(rng, train_tiny.EVAL_SEQUENCES)  # (EVAL_SEQUENCES, T) each, held out
    start = init_params(train_tiny.CONFIG, seed=seed, dtype=np.float32)
    reference = train_tiny.train_tiny_gpt(seed)["params"]  # minilora's optimiser and layers, here
    result = student["train_tiny"].train_tiny_gpt(seed)
    assert result["optim"] == "optim.py", "train_tiny.py must train with the optim.py beside it"
    params = check_trained_params(result["params"], start)
    losses = [train_tiny.held_out_loss(p, x, y) for p in (start, reference, params)]
    return (*losses, ", ".join(result["layers"]) or "none (the reference layers stood in)")


@pytest.mark.points(3)
def test_a_tiny_gpt_trained_with_your_optimiser_reaches_the_reference_loss(student, rng):
    """train_tiny.py's GPT, trained by your AdamW, clipping and schedule on your a1-a3 layers where present.

    Each of RUNS runs passes when its held-out loss falls at least (1 - MARGIN) of the way minilora's
    run on the same seed falls; a majority must pass. One run's outcome depends on its seed (a
    subtly wrong step can learn on one and stall on the next), a majority of five hardly does.
    """
    runs = [training_run(student, rng) for _ in range(RUNS)]
    passed = [
        math.isfinite(after) and after <= ref + MARGIN * (before - ref) for before, ref, after, _ in runs
    ]
    report = "; ".join(f"{before:.3f} -> {after:.3f} (minilora {ref:.3f})" for before, ref, after, _ in runs)
    assert sum(passed) > RUNS // 2, (
        f"held-out loss fell less than {1 - MARGIN:.0%} of minilora's fall in {RUNS - sum(passed)} of "
        f"{RUNS} runs: {report} (your a1-a3 files used: {runs[0][3]})"
    )
