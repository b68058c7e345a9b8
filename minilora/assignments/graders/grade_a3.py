"""Grader for a3: causal self-attention.

The backward is checked against finite differences of a naive causal attention written here, not of
the submission's own forward: a forward that attends to later positions has a self-consistent
backward, and must not earn the backward's points with it.
"""

import numpy as np
import pytest

from minilora.gradcheck import check_gradients
from minilora.layers import make_dropout_mask

TOL = 1e-7
B, T, C, H = 2, 5, 8, 2


def naive_attention(qkv, n_head, mask=None):
    """One head, one sequence and one position at a time, with Python loops: slow and obviously right."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    out = np.zeros((B, T, C))
    for b in range(B):
        for h in range(n_head):
            q, k, v = (qkv[b, :, i * C + h * hs : i * C + (h + 1) * hs] for i in range(3))
            for t in range(T):
                scores = q[t] @ k[: t + 1].T / np.sqrt(hs)
                weights = np.exp(scores - scores.max())
                weights = weights / weights.sum()
                if mask is not None:
                    weights = weights * mask[b, h, t, : t + 1]
                out[b, t, h * hs : (h + 1) * hs] = weights @ v[: t + 1]
    return out


def check_backward_against_the_naive_attention(m, qkv, rng, mask=None):
    dout = rng.standard_normal((B, T, C))
    _, cache = m.attention_forward(qkv, H, mask)
    dqkv = m.attention_backward(dout, cache)
    params = {"qkv": qkv.copy()}
    result = check_gradients(
        lambda: np.sum(naive_attention(params["qkv"], H, mask) * dout), params, {"qkv": dqkv}
    )
    result.assert_ok(TOL)


@pytest.mark.points(2)
def test_attention_forward_equals_a_naive_causal_attention(student, rng):
    qkv = rng.standard_normal((B, T, 3 * C))
    np.testing.assert_allclose(
        student["attention"].attention_forward(qkv, H)[0], naive_attention(qkv, H), rtol=1e-10, atol=1e-12
    )


@pytest.mark.points(3)
def test_attention_backward_matches_finite_differences_of_causal_attention(student, rng):
    check_backward_against_the_naive_attention(student["attention"], rng.standard_normal((B, T, 3 * C)), rng)


@pytest.mark.points(2)
def test_attention_backward_with_dropout_matches_finite_differences(student, rng):
    mask = make_dropout_mask(rng, (B, H, T, T), 0.3, np.float64)
    check_backward_against_the_naive_attention(
        student["attention"], rng.standard_normal((B, T, 3 * C)), rng, mask
    )


@pytest.mark.points(1)
def test_no_position_sees_a_later_one(student, rng):
    m = student["attention"]
    qkv = rng.standard_normal((B, T, 3 * C))
    changed = qkv.copy()
    changed[:, -1] += 10.0  # only the last position's q, k and v
    before, after = m.attention_forward(qkv, H)[0], m.attention_forward(changed, H)[0]
    np.testing.assert_array_equal(
        after[:, :-1], before[:, :-1], err_msg="an earlier output moved: it saw the future"
    )


@pytest.mark.points(1)
def test_large_scores_stay_finite_and_exact(student, rng):
    """Scores near 1e3: exp overflows unless each row is shifted by its max."""
    qkv = 20 * rng.standard_normal((B, T, 3 * C))  # scores up to about 1e3
    out = student["attention"].attention_forward(qkv, H)[0]
    assert np.all(np.isfinite(out)), "the softmax overflowed: shift each row by its max before exp"
    np.testing.assert_allclose(out, naive_attention(qkv, H), rtol=1e-9, atol=1e-9)


@pytest.mark.points(1)
def test_attention_keeps_float32(student, rng):
    m = student["attention"]
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    out, cache = m.attention_forward(qkv, H)
    assert out.dtype == np.float32, "float32 in, float32 out"
    assert m.attention_backward(np.ones_like(out), cache).dtype == np.float32, "float32 in, float32 out"
    np.testing.assert_allclose(out, naive_attention(qkv.astype(np.float64), H), rtol=1e-4, atol=1e-5)
