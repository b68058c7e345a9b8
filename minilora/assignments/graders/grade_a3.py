"""Grader for a3: causal self-attention.

The backward is checked against finite differences of a naive causal attention written here, not of
the submission's own forward: a forward that attends to later positions has a self-consistent
backward, and must not earn the backward's points with it.

Every number a part feeds the submission is drawn from the part's ``rng``: the inputs, the upstream
gradients, the dropout mask, which positions change and how many queries a cached call sends.
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


def split(qkv):
    """(B, T, 3C) -> q, k, v, each (B, H, T, hs): the layout split_heads gives."""
    return qkv.reshape(B, T, 3, H, C // H).transpose(2, 0, 3, 1, 4)


def merge(y):
    """(B, H, T_q, hs) -> (B, T_q, C): the heads side by side, as merge_heads joins them."""
    return y.transpose(0, 2, 1, 3).reshape(B, y.shape[2], C)


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
    t = int(rng.integers(1, T))  # positions t.. change, 0..t-1 must not notice
    changed = qkv.copy()
    changed[:, t:] += 10.0 * rng.standard_normal((B, T - t, 3 * C))  # their q, k and v
    before, after = m.attention_forward(qkv, H)[0], m.attention_forward(changed, H)[0]
    np.testing.assert_array_equal(
        after[:, :t], before[:, :t], err_msg="an earlier output moved: it saw the future"
    )


@pytest.mark.points(1)
def test_large_scores_stay_finite_and_exact(student, rng):
    """A score of exactly 1e3 on every draw: exp overflows unless each row is shifted by its max."""
    qkv = 20 * rng.standard_normal((B, T, 3 * C))
    q, k, _ = split(qkv)  # (B, H, T, hs) each
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(C // H)  # (B, H, T, T)
    top = scores[..., np.tril(np.ones((T, T), bool))].max()  # the largest score a query may attend to
    qkv[..., :C] *= 1000.0 / top  # scores are linear in q: the largest becomes 1e3, past exp's range
    out = student["attention"].attention_forward(qkv, H)[0]
    assert np.all(np.isfinite(out)), "the softmax overflowed: shift each row by its max before exp"
    np.testing.assert_allclose(out, naive_attention(qkv, H), rtol=1e-9, atol=1e-9)


@pytest.mark.points(1)
def test_attention_keeps_float32(student, rng):
    m = student["attention"]
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    out, cache = m.attention_forward(qkv, H)
    assert out.dtype == np.float32, "float32 in, float32 out"
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    assert m.attention_backward(dout, cache).dtype == np.float32, "float32 in, float32 out"
    np.testing.assert_allclose(out, naive_attention(qkv.astype(np.float64), H), rtol=1e-4, atol=1e-5)
    y, q_scaled, att, _ = m.scaled_dot_product_attention(*split(qkv))
    assert y.dtype == q_scaled.dtype == att.dtype == np.float32, "float32 in, float32 out"


@pytest.mark.points(2)
def test_the_last_queries_attend_over_every_key_as_in_generation(student, rng):
    """Generation (cached_attention_forward) sends the queries of the last T_q positions against the
    keys of all T_k: each query sees the keys up to its own position, as in full attention. A mask
    read off the scores' diagonal is right only when T_q = T_k."""
    qkv = rng.standard_normal((B, T, 3 * C))
    T_q = int(rng.integers(2, T))  # 2 .. T-1 new positions: the first of them has a later key to hide
    q, k, v = split(qkv)  # (B, H, T, hs) each
    y, _, att, _ = student["attention"].scaled_dot_product_attention(q[:, :, -T_q:], k, v)
    assert att.shape == (B, H, T_q, T), f"att has shape {att.shape}, not (B, H, T_q, T_k)"
    np.testing.assert_allclose(merge(y), naive_attention(qkv, H)[:, -T_q:], rtol=1e-10, atol=1e-12)
