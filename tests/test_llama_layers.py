"""The Llama-family layers (RMSNorm, RoPE, SwiGLU, grouped-query attention) against finite differences and oracles.

Every backward is checked element by element against central differences in float64, on small
non-degenerate inputs (gains away from 1, angles well away from 0, a dropout mask with p > 0).
Forwards are checked against formulas written out here, against the GPT-2 attention of this
package, and, where PyTorch and transformers are installed, against their implementations.
"""

import warnings

import numpy as np
import pytest

from minilora.gradcheck import check_layer
from minilora.layers import (
    attention_backward,
    attention_forward,
    cached_gqa_attention_forward,
    gqa_attention_backward,
    gqa_attention_forward,
    make_dropout_mask,
    merge_heads,
    rmsnorm_backward,
    rmsnorm_forward,
    rope_backward,
    rope_forward,
    rope_tables,
    sigmoid,
    swiglu_backward,
    swiglu_forward,
    to_heads,
)
from minilora.layers.attention import scaled_dot_product_attention, split_heads

LAYER_TOL = 1e-7
ORACLE_TOL = 1e-12
B, T, C, H, H_KV, HS = 2, 5, 8, 4, 2, 4
EPS = 1e-5  # SmolLM2's rms_norm_eps
THETA = 10.0  # a small base, so that every pair turns by a sizeable angle within T positions


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


def pair_indices(hs, pairing):
    """The (first, second) dimension of every pair, written out from each layout's definition."""
    j = np.arange(hs // 2)
    return (j, j + hs // 2) if pairing == "half" else (2 * j, 2 * j + 1)


def llama_cpp_permute(weights, n_head, n_head_kv=None):
    """convert_hf_to_gguf.py's LlamaModel.permute, transcribed to NumPy: HF q/k rows -> GGUF rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def repeat_kv(x, n_rep):
    """(B, H_kv, T, hs) -> (B, H_kv * n_rep, T, hs), each kv head repeated n_rep times in a row."""
    return np.repeat(x, n_rep, axis=1)


# RMSNorm


def test_rmsnorm_backward_matches_finite_differences(rng):
    inputs = {
        "x": 1.0 + 2.0 * rng.standard_normal((B, T, C)),
        "w": 1.0 + 0.5 * rng.standard_normal(C),
    }
    result = check_layer(lambda x, w: rmsnorm_forward(x, w, EPS), rmsnorm_backward, inputs, ("x", "w"))
    result.assert_ok(LAYER_TOL)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rmsnorm_equals_the_formula_written_out_and_uses_its_eps(rng, eps):
    x = 3e-3 * rng.standard_normal((B, T, C))  # mean(x^2) ~ 1e-5: eps changes the result
    w = 1.0 + 0.5 * rng.standard_normal(C)
    out, _ = rmsnorm_forward(x, w, eps)
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * w
    np.testing.assert_allclose(out, expected, rtol=ORACLE_TOL, atol=0)
    other, _ = rmsnorm_forward(x, w, 1e-5 if eps == 1e-6 else 1e-6)
    assert not np.allclose(out, other, rtol=1e-3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rmsnorm_of_large_rows_stays_finite(rng, dtype):
    x = (1e3 * rng.standard_normal((B, T, C))).astype(dtype)
    w = np.ones(C, dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out, cache = rmsnorm_forward(x, w, EPS)
        dx, dw = rmsnorm_backward(np.ones_like(out), cache)
    assert out.dtype == dtype and np.all(np.isfinite(out)) and np.all(np.isfinite(dx))
    np.testing.assert_allclose(np.sqrt(np.mean(out.astype(np.float64) ** 2, axis=-1)), 1.0, rtol=1e-5)


def test_rmsnorm_matches_torch_rms_norm():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((B, T, C)), 1.0 + 0.5 * rng.standard_normal(C)
    expected = torch.nn.functional.rms_norm(torch.from_numpy(x), (C,), torch.from_numpy(w), EPS).numpy()
    np.testing.assert_allclose(rmsnorm_forward(x, w, EPS)[0], expected, rtol=ORACLE_TOL, atol=ORACLE_TOL)


# RoPE


@pytest.mark.parametrize("pairing", ["half", "adjacent"])
def test_rope_backward_matches_finite_differences(rng, pairing):
    cos, sin = rope_tables(T, 8, 3, THETA, np.float64, np)
    inputs = {"x": rng.standard_normal((B, H, T, 8))}
    result = check_layer(lambda x: rope_forward(x, cos, sin, pairing), rope_backward, inputs, ("x",))
    result.assert_ok(LAYER_TOL)


@pytest.mark.parametrize("pairing", ["half", "adjacent"])
def test_rope_backward_is_the_inverse_rotation(rng, pairing):
    x = rng.standard_normal((B, H, T, 8))
    cos, sin = rope_tables(T, 8, 2, THETA, np.float64, np)
    out, cache = rope_forward(x, cos, sin, pairing)
    assert not np.allclose(out, x)
    np.testing.assert_allclose(rope_backward(out, cache), x, rtol=0, atol=ORACLE_TOL)


@pytest.mark.parametrize("pairing", ["half", "adjacent"])
def test_rope_preserves_the_norm_of_every_pair(rng, pairing):
    x = rng.standard_normal((B, H, T, 8))
    out, _ = rope_forward(x, *rope_tables(T, 8, 7, THETA, np.float64, np), pairing)
    first, second = pair_indices(8, pairing)
    norm_in = x[..., first] ** 2 + x[..., second] ** 2
    norm_out = out[..., first] ** 2 + out[..., second] ** 2
    np.testing.assert_allclose(norm_out, norm_in, rtol=ORACLE_TOL, atol=0)
    # the other layout's pairs are not rotated as pairs, so their norms change
    other_first, other_second = pair_indices(8, "adjacent" if pairing == "half" else "half")
    assert not np.allclose(out[..., other_first] ** 2 + out[..., other_second] ** 2, norm_in)


@pytest.mark.parametrize("pairing", ["half", "adjacent"])
def test_rope_at_position_zero_is_the_identity(rng, pairing):
    cos, sin = rope_tables(T, 8, 0, THETA, np.float64, np)
    np.testing.assert_array_equal(cos[0], np.ones(4))
    np.testing.assert_array_equal(sin[0], np.zeros(4))
    x = rng.standard_normal((B, H, T, 8))
    out, _ = rope_forward(x, cos, sin, pairing)
    np.testing.assert_array_equal(out[:, :, 0], x[:, :, 0])
    assert not np.allclose(out[:, :, 1:], x[:, :, 1:])  # every later position moves


@pytest.mark.parametrize("pairing", ["half", "adjacent"])
def test_rope_start_offsets_equal_slicing_a_longer_table(rng, pairing):
    start = 6
    long_cos, long_sin = rope_tables(start + T, 8, 0, 100000.0, np.float64, np)
    cos, sin = rope_tables(T, 8, start, 100000.0, np.float64, np)
    np.testing.assert_array_equal(cos, long_cos[start:])
    np.testing.assert_array_equal(sin, long_sin[start:])
    x_long = rng.standard_normal((B, H, start + T, 8))
    out_long, _ = rope_forward(x_long, long_cos, long_sin, pairing)
    out, _ = rope_forward(x_long[:, :, start:], cos, sin, pairing)
    np.testing.assert_array_equal(out, out_long[:, :, start:])


def test_rope_tables_have_the_llama_angles():
    cos, sin = rope_tables(3, 4, 5, 100000.0, np.float32, np)
    assert cos.shape == sin.shape == (3, 2) and cos.dtype == sin.dtype == np.float32
    angle = np.array([5.0, 6.0, 7.0])[:, None] * np.array([1.0, 100000.0**-0.5])[None, :]
    np.testing.assert_allclose(cos, np.cos(angle), rtol=0, atol=1e-7)
    np.testing.assert_allclose(sin, np.sin(angle), rtol=0, atol=1e-7)


@pytest.mark.parametrize("pairing", ["half", "adjacent"])
def test_rope_scores_depend_only_on_the_relative_position(rng, pairing):
    q, k = rng.standard_normal((1, 1, 1, 8)), rng.standard_normal((1, 1, 1, 8))

    def score(m, n):  # q at position m against k at position n
        q_rot, _ = rope_forward(q, *rope_tables(1, 8, m, THETA, np.float64, np), pairing)
        k_rot, _ = rope_forward(k, *rope_tables(1, 8, n, THETA, np.float64, np), pairing)
        return float(np.sum(q_rot * k_rot))

    assert score(7, 3) == pytest.approx(score(4, 0), rel=ORACLE_TOL)
    assert score(7, 3) == pytest.approx(score(12, 8), rel=ORACLE_TOL)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_the_gguf_loader_undoes_llama_cpps_permutation(rng):
    from minilora.io.llama_gguf import unpermute_rope_rows

    for heads in (H, H_KV):
        w = rng.standard_normal((heads * 8, C))  # nn.Linear layout (C_out, C_in), hs = 8
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, H, heads), heads), w)
        assert not np.array_equal(llama_cpp_permute(w, H, heads), w)


def test_rope_pairings_are_the_same_map_up_to_llama_cpp_permutation(rng):
    hs = 8
    # GGUF dimension 2j + s holds Hugging Face dimension s * hs/2 + j: pair j = (j, j + hs/2) -> (2j, 2j + 1)
    perm = np.array([(r % 2) * (hs // 2) + r // 2 for r in range(hs)])
    # the converter's own reshape/swap, applied to the row numbers of one head, is the same permutation
    np.testing.assert_array_equal(llama_cpp_permute(np.arange(hs), 1), perm)
    assert not np.array_equal(perm, np.arange(hs))

    cos, sin = rope_tables(T, hs, 3, THETA, np.float64, np)
    x = rng.standard_normal((B, H, T, hs))
    half, _ = rope_forward(x, cos, sin, "half")
    adjacent, _ = rope_forward(x[..., perm], cos, sin, "adjacent")
    np.testing.assert_allclose(adjacent, half[..., perm], rtol=0, atol=ORACLE_TOL)
    wrong, _ = rope_forward(x, cos, sin, "adjacent")  # the same layout under the other pairing is different
    assert not np.allclose(wrong, half)

    # On weights: GGUF's permuted q_proj/k_proj rows with "adjacent" give Hugging Face's scores with "half".
    hidden = rng.standard_normal((B, T, C))
    wq, wk = rng.standard_normal((H * hs, C)), rng.standard_normal((H_KV * hs, C))  # nn.Linear (out, in)
    wq_gguf, wk_gguf = llama_cpp_permute(wq, H, H), llama_cpp_permute(wk, H, H_KV)

    def scores(w_q, w_k, pairing):
        q, _ = rope_forward(to_heads(hidden @ w_q.T, H), cos, sin, pairing)  # (B, H, T, hs)
        k, _ = rope_forward(to_heads(hidden @ w_k.T, H_KV), cos, sin, pairing)  # (B, H_kv, T, hs)
        return q @ repeat_kv(k, H // H_KV).swapaxes(-1, -2)  # (B, H, T, T)

    hf_scores = scores(wq, wk, "half")
    np.testing.assert_allclose(scores(wq_gguf, wk_gguf, "adjacent"), hf_scores, rtol=0, atol=1e-11)
    assert not np.allclose(scores(wq_gguf, wk_gguf, "half"), hf_scores)


def test_rope_half_matches_hugging_face_apply_rotary_pos_emb(rng):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    theta, hs, start = 100000.0, 16, 4
    q, k = rng.standard_normal((B, H, T, hs)), rng.standard_normal((B, H_KV, T, hs))
    # Hugging Face's tables, in float64: inv_freq, then emb = cat(freqs, freqs) over the head dimension
    inv_freq = 1.0 / theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    freqs = torch.arange(start, start + T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None]  # (1, T, hs)
    q_hf, k_hf = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), emb.cos(), emb.sin())

    cos, sin = rope_tables(T, hs, start, theta, np.float64, np)
    np.testing.assert_allclose(rope_forward(q, cos, sin, "half")[0], q_hf.numpy(), rtol=0, atol=ORACLE_TOL)
    np.testing.assert_allclose(rope_forward(k, cos, sin, "half")[0], k_hf.numpy(), rtol=0, atol=ORACLE_TOL)

    # LlamaRotaryEmbedding builds the same tables, in float32 whatever its input's dtype
    config = LlamaConfig(
        hidden_size=H * hs,
        num_attention_heads=H,
        num_key_value_heads=H_KV,
        head_dim=hs,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(
        torch.zeros(1, T, hs, dtype=torch.float64), torch.arange(start, start + T)[None]
    )
    for ours, theirs in ((cos, hf_cos[0].numpy()), (sin, hf_sin[0].numpy())):
        np.testing.assert_allclose(np.concatenate([ours, ours], axis=-1), theirs, rtol=0, atol=1e-6)


def test_rope_rejects_a_table_of_the_wrong_shape_an_odd_head_and_an_unknown_pairing(rng):
    x = rng.standard_normal((B, H, T, 8))
    with pytest.raises(ValueError, match="expected"):
        rope_forward(x, *rope_tables(1, 8, 0, THETA, np.float64, np))  # would broadcast over T
    with pytest.raises(ValueError, match="pairing"):
        rope_forward(x, *rope_tables(T, 8, 0, THETA, np.float64, np), "interleaved")
    with pytest.raises(ValueError, match="odd"):
        rope_tables(T, 7, 0, THETA, np.float64, np)


# SwiGLU


def test_swiglu_backward_matches_finite_differences(rng):
    inputs = {"g": 3.0 * rng.standard_normal((B, T, 3 * C)), "u": rng.standard_normal((B, T, 3 * C))}
    result = check_layer(swiglu_forward, swiglu_backward, inputs, ("g", "u"))
    result.assert_ok(LAYER_TOL)


def test_swiglu_matches_torch_silu(rng):
    torch = pytest.importorskip("torch")
    g, u = 4.0 * rng.standard_normal((B, T, 3 * C)), rng.standard_normal((B, T, 3 * C))
    expected = (torch.nn.functional.silu(torch.from_numpy(g)) * torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(swiglu_forward(g, u)[0], expected, rtol=ORACLE_TOL, atol=ORACLE_TOL)


@pytest.mark.parametrize("dtype, big", [(np.float64, 1e3), (np.float32, 1e3), (np.float32, 100.0)])
def test_swiglu_is_stable_for_huge_gates(dtype, big):
    g = np.array([-big, -1.0, 0.0, 1.0, big], dtype=dtype)
    u = np.full(5, 2.0, dtype=dtype)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        out, cache = swiglu_forward(g, u)
        dg, du = swiglu_backward(np.ones_like(out), cache)
    assert out.dtype == dtype and np.all(np.isfinite(out)) and np.all(np.isfinite(dg))
    assert abs(out[0]) < 1e-30 and out[-1] == 2.0 * big  # silu(-big) -> 0, silu(big) -> big
    assert abs(dg[0]) < 1e-30 and dg[-1] == 2.0  # silu' -> 0 and 1 at the two ends
    np.testing.assert_allclose(out[1:4], 2.0 * np.array([-1.0, 0.0, 1.0]) / (1.0 + np.exp([1.0, 0.0, -1.0])))


def test_sigmoid_equals_the_textbook_formula_where_that_does_not_overflow(rng):
    x = 10.0 * rng.standard_normal(100)
    np.testing.assert_allclose(sigmoid(x), 1.0 / (1.0 + np.exp(-x)), rtol=1e-14, atol=0)


# Grouped-query attention


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_gqa_attention_backward_matches_finite_differences(rng, n_kv_head):
    inputs = {
        "q": rng.standard_normal((B, H, T, HS)),
        "k": rng.standard_normal((B, n_kv_head, T, HS)),
        "v": rng.standard_normal((B, n_kv_head, T, HS)),
    }
    result = check_layer(gqa_attention_forward, gqa_attention_backward, inputs, ("q", "k", "v"))
    result.assert_ok(LAYER_TOL)


def test_gqa_attention_backward_with_dropout_mask_matches_finite_differences(rng):
    mask = make_dropout_mask(np.random.default_rng(7), (B, H, T, T), 0.3, np.float64)
    assert 0 < np.count_nonzero(mask) < mask.size
    inputs = {
        "q": rng.standard_normal((B, H, T, HS)),
        "k": rng.standard_normal((B, H_KV, T, HS)),
        "v": rng.standard_normal((B, H_KV, T, HS)),
    }
    result = check_layer(
        lambda q, k, v: gqa_attention_forward(q, k, v, mask), gqa_attention_backward, inputs, ("q", "k", "v")
    )
    result.assert_ok(LAYER_TOL)


def test_gqa_with_as_many_kv_heads_as_query_heads_is_multi_head_attention(rng):
    q, k, v = (rng.standard_normal((B, H, T, HS)) for _ in range(3))
    y, _ = gqa_attention_forward(q, k, v)
    expected, _, _, _ = scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(y, expected, rtol=0, atol=ORACLE_TOL)


def test_gqa_equals_multi_head_attention_over_repeated_kv_heads_forward_and_backward(rng):
    n_head, n_kv_head = 6, 2
    G = n_head // n_kv_head
    q = rng.standard_normal((B, n_head, T, HS))
    k, v = rng.standard_normal((B, n_kv_head, T, HS)), rng.standard_normal((B, n_kv_head, T, HS))
    mask = make_dropout_mask(np.random.default_rng(3), (B, n_head, T, T), 0.2, np.float64)
    dout = rng.standard_normal((B, n_head, T, HS))
    y, cache = gqa_attention_forward(q, k, v, mask)
    dq, dk, dv = gqa_attention_backward(dout, cache)

    # GPT-2's attention on the fused (B, T, 3C) layout, every kv head copied to its G query heads
    qkv = np.concatenate([merge_heads(q), merge_heads(repeat_kv(k, G)), merge_heads(repeat_kv(v, G))], -1)
    y_mha, cache_mha = attention_forward(qkv, n_head, mask)
    np.testing.assert_allclose(merge_heads(y), y_mha, rtol=0, atol=ORACLE_TOL)
    dq_mha, dk_mha, dv_mha = split_heads(attention_backward(merge_heads(dout), cache_mha), n_head)
    np.testing.assert_allclose(dq, dq_mha, rtol=0, atol=ORACLE_TOL)
    # a kv head fans out to its G query heads: its gradient is the sum of theirs
    np.testing.assert_allclose(dk, dk_mha.reshape(B, n_kv_head, G, T, HS).sum(2), rtol=0, atol=ORACLE_TOL)
    np.testing.assert_allclose(dv, dv_mha.reshape(B, n_kv_head, G, T, HS).sum(2), rtol=0, atol=ORACLE_TOL)


def test_gqa_matches_torch_scaled_dot_product_attention_with_enable_gqa(rng):
    torch = pytest.importorskip("torch")
    n_head, n_kv_head = 6, 2
    q = rng.standard_normal((B, n_head, T, HS))
    k, v = rng.standard_normal((B, n_kv_head, T, HS)), rng.standard_normal((B, n_kv_head, T, HS))
    dout = rng.standard_normal((B, n_head, T, HS))
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    y_torch = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
    y_torch.backward(torch.from_numpy(dout))

    y, cache = gqa_attention_forward(q, k, v)
    np.testing.assert_allclose(y, y_torch.detach().numpy(), rtol=0, atol=ORACLE_TOL)
    for ours, theirs in zip(gqa_attention_backward(dout, cache), (tq, tk, tv)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=0, atol=ORACLE_TOL)


def test_gqa_is_causal(rng):
    q = rng.standard_normal((B, H, T, HS))
    k, v = rng.standard_normal((B, H_KV, T, HS)), rng.standard_normal((B, H_KV, T, HS))
    k2, v2 = k.copy(), v.copy()
    k2[:, :, -1] += 1.0  # change only the last position's key and value
    v2[:, :, -1] += 1.0
    y, _ = gqa_attention_forward(q, k, v)
    y2, _ = gqa_attention_forward(q, k2, v2)
    np.testing.assert_array_equal(y[:, :, :-1], y2[:, :, :-1])
    assert not np.allclose(y[:, :, -1], y2[:, :, -1])


def test_cached_gqa_fed_one_position_at_a_time_equals_the_full_forward(rng):
    hs, theta, T_max = 8, 100000.0, T + 3
    q = rng.standard_normal((B, H, T, hs))
    k, v = rng.standard_normal((B, H_KV, T, hs)), rng.standard_normal((B, H_KV, T, hs))
    cos, sin = rope_tables(T, hs, 0, theta, np.float64, np)
    y_full, _ = gqa_attention_forward(rope_forward(q, cos, sin)[0], rope_forward(k, cos, sin)[0], v)

    keys, values = np.zeros((B, H_KV, T_max, hs)), np.zeros((B, H_KV, T_max, hs))
    prefill = 2  # a prompt of two positions in one call, then one position per call
    steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]
    outputs = []
    for start, end in steps:
        cos_t, sin_t = rope_tables(end - start, hs, start, theta, np.float64, np)
        q_t, _ = rope_forward(q[:, :, start:end], cos_t, sin_t)
        k_t, _ = rope_forward(k[:, :, start:end], cos_t, sin_t)
        outputs.append(cached_gqa_attention_forward(q_t, k_t, v[:, :, start:end], keys, values, start))
    np.testing.assert_allclose(np.concatenate(outputs, axis=2), y_full, rtol=0, atol=ORACLE_TOL)
    np.testing.assert_array_equal(keys[:, :, T:], 0.0)  # nothing written past the last position


def test_to_heads_splits_a_projection_head_by_head_and_merge_heads_inverts_it(rng):
    x = rng.standard_normal((B, T, H_KV * HS))
    heads = to_heads(x, H_KV)
    assert heads.shape == (B, H_KV, T, HS)
    np.testing.assert_array_equal(heads[:, 1, 3], x[:, 3, HS : 2 * HS])
    np.testing.assert_array_equal(merge_heads(heads), x)


def test_gqa_rejects_heads_that_do_not_group(rng):
    q, k = rng.standard_normal((B, 3, T, HS)), rng.standard_normal((B, 2, T, HS))
    with pytest.raises(ValueError, match="groups"):
        gqa_attention_forward(q, k, k)
    with pytest.raises(ValueError, match="n_head"):
        to_heads(rng.standard_normal((B, T, 10)), 4)
