"""Grader for a3: causal self-attention."""

import numpy as np
import pytest

from minilora.gradcheck import check_layer
from minilora.layers import make_dropout_mask

TOL = 1e-7
B, T, C, H = 2, 5, 8, 2


@pytest.fixture
def rng():
    return np.random.default_rng(303)


def naive_attention(qkv, n_head):
    """One head and one sequence at a time, with Python loops: slow and obviously right."""
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
                out[b, t, h * hs : (h + 1) * hs] = (weights / weights.sum()) @ v[: t + 1]
    return out


@pytest.mark.points(2)
def test_attention_forward_equals_a_naive_causal_attention(student, rng):
    qkv = rng.standard_normal((B, T, 3 * C))
    np.testing.assert_allclose(
        student["attention"].attention_forward(qkv, H)[0], naive_attention(qkv, H), rtol=1e-10, atol=1e-12
    )


@pytest.mark.points(3)
def test_attention_backward_matches_finite_differences(student, rng):
    m = student["attention"]
    check_layer(
        lambda qkv: m.attention_forward(qkv, H),
        m.attention_backward,
        {"qkv": rng.standard_normal((B, T, 3 * C))},
        ("qkv",),
    ).assert_ok(TOL)


@pytest.mark.points(1)
def test_attention_backward_with_dropout_matches_finite_differences(student, rng):
    m = student["attention"]
    mask = make_dropout_mask(np.random.default_rng(1), (B, H, T, T), 0.3, np.float64)
    check_layer(
        lambda qkv: m.attention_forward(qkv, H, mask),
        m.attention_backward,
        {"qkv": rng.standard_normal((B, T, 3 * C))},
        ("qkv",),
    ).assert_ok(TOL)
