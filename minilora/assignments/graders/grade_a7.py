"""Grader for a7: DoRA's two backwards, rsLoRA's scale and PiSSA's start.

DoRA's gradients are checked against finite differences of the DoRA layer written out here
(y = (m / n) * (x W + s (drop(x) lora_A^T) lora_B^T) + b), once with the norm n held at its value
and once recomputed from lora_A and lora_B, so a backward that matches a wrong forward of the
submission's own earns nothing. A second backward on the same cache must give the same gradients
(a backward that writes into the cache's W, m or factors corrupts the model's own arrays), and
compute_db=False must give no bias gradient (AdamW refuses a gradient for a frozen bias). PiSSA's
factors are checked by what they must be: the best rank-r approximation of W (its error is the tail
of W's singular values, Eckart-Young) split evenly between the two factors. DoRA's backwards and
PiSSA's factors have float32 parts: float32 in, float32 out.
"""

import numpy as np
import pytest

from minilora.gradcheck import check_gradients
from minilora.layers import make_dropout_mask

TOL = 1e-7
C_IN, C_OUT, R = 6, 5, 3


def dora_written_out(x, W, b, lora_A, lora_B, magnitude, s, norm=None, mask=None):
    """DoRA's forward from its definition; ``norm`` None recomputes n = ||W + s lora_A^T lora_B^T|| per column."""
    V = W + s * lora_A.T @ lora_B.T  # (C_in, C_out)
    n = np.sqrt((V**2).sum(axis=0)) if norm is None else norm  # (C_out,)
    x_in = x if mask is None else x * mask
    u = x_in @ W + s * (x_in @ lora_A.T) @ lora_B.T  # (..., C_out)
    return (x - x_in) @ W + u * (magnitude / n) + (0.0 if b is None else b)  # PEFT's dropout


def drawn(rng):
    return {
        "x": rng.standard_normal((2, 4, C_IN)),
        "W": rng.standard_normal((C_IN, C_OUT)),
        "b": rng.standard_normal(C_OUT),
        "lora_A": rng.standard_normal((R, C_IN)),
        "lora_B": rng.standard_normal((C_OUT, R)),
        "magnitude": 1.0 + rng.random(C_OUT),
    }


def held_norm(inputs, s):
    """n = the column norms of V = W + s lora_A^T lora_B^T at the drawn values, (C_out,)."""
    V = inputs["W"] + s * inputs["lora_A"].T @ inputs["lora_B"].T  # (C_in, C_out)
    return np.sqrt((V**2).sum(axis=0))


def dora_forward(student, inputs, s, exact, bias=True, mask=None, dtype=np.float64):
    """The submission's forward on ``inputs`` in ``dtype``, n held at its value unless ``exact``: (out, cache)."""
    cast = {name: value.astype(dtype) for name, value in inputs.items()}
    return student["dora"].dora_linear_forward(
        cast["x"], cast["W"], cast["b"] if bias else None, cast["lora_A"], cast["lora_B"], cast["magnitude"], s,
        dropout_mask=None if mask is None else mask.astype(dtype),
        weight_norm=None if exact else held_norm(inputs, s).astype(dtype),
        exact_norm_gradient=exact,
    )  # fmt: skip


def check_repeatable(student, cache, dout, first):
    """A second backward on the same cache gives the same gradients: the first left W, m and the factors alone."""
    again = student["dora"].dora_linear_backward(dout, cache)
    for name, a, b in zip(("dx", "db", "dlora_A", "dlora_B", "dm"), first, again):
        if a is not None:
            message = f"{name} changed on a second backward: was the cache written?"
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=0, err_msg=message)


def check_dora(student, rng, exact, bias=True, mask=None, dtype=np.float64, tol=TOL):
    """The submission's DoRA backward against finite differences of dora_written_out, in float64."""
    inputs = drawn(rng)
    s = float(rng.uniform(0.5, 3.0))
    norm = held_norm(inputs, s)
    out, cache = dora_forward(student, inputs, s, exact, bias, mask, dtype)
    dout = rng.standard_normal(out.shape).astype(dtype)
    first = student["dora"].dora_linear_backward(dout, cache)
    dx, db, dlora_A, dlora_B, dm = first
    grads = {"x": dx, "lora_A": dlora_A, "lora_B": dlora_B, "magnitude": dm}
    if bias:
        grads["b"] = db
    else:
        assert db is None, "a layer without a bias has no bias gradient"
    if dtype == np.float32:
        assert out.dtype == np.float32, "float32 in, float32 out"
        assert all(g.dtype == np.float32 for g in grads.values()), "float32 in, float32 out"
    check_repeatable(student, cache, dout, first)
    params = {name: value.copy() for name, value in inputs.items()}
    dout = dout.astype(np.float64)

    def loss():
        held = None if exact else norm  # the detached backward is the gradient with n fixed at its value
        return float(
            np.sum(
                dora_written_out(
                    params["x"], params["W"], params["b"] if bias else None, params["lora_A"],
                    params["lora_B"], params["magnitude"], s, held, mask,
                ) * dout
            )
        )  # fmt: skip

    check_gradients(loss, params, grads).assert_ok(tol)


@pytest.mark.points(3)
def test_dora_backward_with_the_norm_held_constant_matches_finite_differences(student, rng):
    check_dora(student, rng, exact=False)


@pytest.mark.points(3)
def test_dora_exact_backward_through_the_norm_matches_finite_differences(student, rng):
    check_dora(student, rng, exact=True)


@pytest.mark.points(1)
def test_dora_backwards_with_a_dropout_mask_and_no_bias(student, rng):
    """lora_dropout drops the input of what m / n rescales (PEFT's definition); without a bias, db is None."""
    mask = make_dropout_mask(rng, (2, 4, C_IN), 0.3, np.float64)
    check_dora(student, rng, exact=False, bias=False, mask=mask)
    check_dora(student, rng, exact=True, bias=False, mask=mask)


@pytest.mark.points(1)
def test_dora_backwards_keep_float32(student, rng):
    check_dora(student, rng, exact=False, dtype=np.float32, tol=1e-4)
    check_dora(student, rng, exact=True, dtype=np.float32, tol=1e-4)


@pytest.mark.points(1)
def test_dora_backward_gives_a_frozen_bias_no_gradient(student, rng):
    """compute_db=False: db is None, the rest unchanged; a gradient for a bias AdamW does not train is a KeyError."""
    for exact in (False, True):
        inputs, s = drawn(rng), float(rng.uniform(0.5, 3.0))
        out, cache = dora_forward(student, inputs, s, exact)
        dout = rng.standard_normal(out.shape)
        trained = student["dora"].dora_linear_backward(dout, cache)
        frozen = student["dora"].dora_linear_backward(dout, cache, compute_db=False)
        assert frozen[1] is None, "compute_db=False: the bias is frozen and must get no gradient (db None)"
        for name, a, b in zip(("dx", "db", "dlora_A", "dlora_B", "dm"), trained, frozen):
            if b is not None:
                np.testing.assert_allclose(b, a, rtol=1e-12, atol=0, err_msg=f"{name} with compute_db=False")


@pytest.mark.points(1)
def test_lora_scaling_plain_and_rank_stabilised(student, rng):
    """lora_alpha / r, and rsLoRA's lora_alpha / sqrt(r): a sum of r independent rank-one terms grows as sqrt(r)."""
    scaling = student["layer"].lora_scaling
    for r in (1, *rng.integers(2, 512, 4).tolist()):
        alpha = float(rng.uniform(1, 64))
        assert scaling(r, alpha) == pytest.approx(alpha / r, rel=1e-12), f"r={r}, alpha={alpha}"
        assert scaling(r, alpha, use_rslora=True) == pytest.approx(alpha / np.sqrt(r), rel=1e-12), (
            f"rsLoRA, r={r}, alpha={alpha}"
        )


def drawn_weight(rng, C_in=12, C_out=9):
    """A weight with well-separated singular values, so its best rank-r part is unique."""
    U, _ = np.linalg.qr(rng.standard_normal((C_in, C_in)))
    V, _ = np.linalg.qr(rng.standard_normal((C_out, C_out)))
    k = min(C_in, C_out)
    S = np.sort(rng.uniform(0.5, 1.0, k) * 2.0 ** -np.arange(k))[::-1] * 10.0
    return (U[:, :k] * S) @ V[:, :k].T, S


@pytest.mark.points(2)
def test_pissa_factors_give_the_best_rank_r_approximation(student, rng):
    W, S = drawn_weight(rng)
    r, s = int(rng.integers(2, 5)), float(rng.uniform(0.5, 4.0))
    lora_A, lora_B = student["init"].pissa_factors(W, r, s)
    assert lora_A.shape == (r, W.shape[0]) and lora_B.shape == (W.shape[1], r)
    approximation = s * lora_A.T @ lora_B.T  # (C_in, C_out)
    error = np.linalg.norm(W - approximation)
    assert error == pytest.approx(np.sqrt(np.sum(S[r:] ** 2)), rel=1e-9), (
        "||W - s lora_A^T lora_B^T|| must be the norm of W's singular values after the r-th"
    )
    assert np.linalg.matrix_rank(approximation) == r


@pytest.mark.points(1)
def test_pissa_factors_split_the_singular_values_evenly(student, rng):
    W, S = drawn_weight(rng)
    r, s = int(rng.integers(2, 5)), float(rng.uniform(0.5, 4.0))
    lora_A, lora_B = student["init"].pissa_factors(W, r, s)
    np.testing.assert_allclose(lora_A @ lora_A.T, np.diag(S[:r] / s), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lora_B.T @ lora_B, np.diag(S[:r] / s), rtol=1e-9, atol=1e-12)


@pytest.mark.points(1)
def test_pissa_factors_of_a_float32_weight_are_float32(student, rng):
    """A float32 W gives float32 factors, still W's best rank-r part split evenly (to float32's precision)."""
    W, S = drawn_weight(rng)
    r, s = int(rng.integers(2, 5)), float(rng.uniform(0.5, 4.0))
    lora_A, lora_B = student["init"].pissa_factors(W.astype(np.float32), r, s)
    assert lora_A.dtype == np.float32 and lora_B.dtype == np.float32, f"float32 in, {lora_A.dtype} out"
    error = np.linalg.norm(W - s * lora_A.astype(np.float64).T @ lora_B.astype(np.float64).T)
    assert error == pytest.approx(np.sqrt(np.sum(S[r:] ** 2)), rel=1e-4)
    np.testing.assert_allclose(lora_A @ lora_A.T, np.diag(S[:r] / s), rtol=1e-4, atol=1e-4)
