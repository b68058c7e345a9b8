# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 8. Flash attention, derived
#
# Plain attention keeps its softmax probabilities, one number for every pair of positions, so that
# the backward can use them. At long sequences they are most of the memory a training step needs.
# FlashAttention (Dao, Fu, Ermon, Rudra and Ré, 2022) computes exactly the same attention tile by
# tile, keeps only one number per query row, and recomputes the probabilities in the backward.
#
# In this notebook we count where attention's memory goes, derive the *online softmax* on one row,
# run the tiled forward of `minilora.layers.flash_attention` against the plain one, derive its
# recomputing backward and check it against finite differences, and then weigh what it saves
# (memory, by formula and measured) against what it costs (one more matrix product per tile).
#
# Shape letters: B batch, H heads, T positions, hs head size, C = H hs channels. `block` is the width
# of a tile, in positions.

# %%
# %matplotlib inline

# %%
import math
import tracemalloc
from functools import partial

import matplotlib.pyplot as plt
import numpy as np

from minilora.backend import count_matmuls
from minilora.fast.cpu.inference import use_one_blas_thread
from minilora.gradcheck import check_layer, relative_error
from minilora.layers import (
    attention_backward,
    attention_forward,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    merge_heads,
)
from minilora.layers.attention import causal_bias, scaled_dot_product_attention, split_heads

blas_threads = use_one_blas_thread()  # as a training step: a Jupyter kernel starts with one per core

rng = np.random.default_rng(0)


def random_heads(B, H, T, hs, dtype=np.float64):
    """Random q, k, v, each (B, H, T, hs)."""
    return tuple(rng.standard_normal((B, H, T, hs)).astype(dtype) for _ in range(3))


def fuse_heads(q, k, v):
    """q, k, v (B, H, T, hs) -> the (B, T, 3C) input of attention_forward, which splits it again."""
    return np.concatenate([merge_heads(q), merge_heads(k), merge_heads(v)], axis=-1)


# %% [markdown]
# ## Where attention's memory goes
#
# `attention_forward` keeps, for the backward, the queries, keys and values (3 B T C numbers) and
# the probabilities `att` (B H T² numbers). For a realistic configuration, GPT-2 small's attention
# (12 heads of 64 channels) on a batch of 8 in float32, per layer:

# %%
B, H, hs, FLOAT32 = 8, 12, 64, 4  # batch, heads, head size, bytes per number
C = H * hs  # 768 channels


def probabilities_bytes(T):
    return B * H * T * T * FLOAT32  # att, (B, H, T, T): what plain attention keeps


def qkv_bytes(T):
    return 3 * B * T * C * FLOAT32  # q, k, v: both kinds of attention keep them


def logsumexp_bytes(T):
    return B * H * T * FLOAT32  # L, (B, H, T): all flash attention keeps beyond q, k, v and its output


MiB, GiB = 2**20, 2**30
print(f"{'T':>5} {'probabilities':>14} {'q, k, v':>10} {'share':>6} {'flash keeps L':>14}")
for T in (256, 1024, 4096):
    share = probabilities_bytes(T) / (probabilities_bytes(T) + qkv_bytes(T))
    print(
        f"{T:>5} {probabilities_bytes(T) / MiB:>10,.0f} MiB {qkv_bytes(T) / MiB:>6,.0f} MiB {share:>6.1%} "
        f"{logsumexp_bytes(T) / MiB:>10.3f} MiB"
    )

# %% [markdown]
# The probabilities grow as T², everything else as T. At T = 1024 they are 384 MiB in every layer
# (4.5 GiB over GPT-2 small's 12 layers), 84% of what the attention keeps; at T = 4096, 6 GiB a layer,
# 72 GiB over 12 layers. Flash attention keeps T times less: L, one number per query row.
# (Training with attention dropout adds a mask of the same (B, H, T, T) shape, doubling the T² part.)

# %%
assert probabilities_bytes(1024) == 384 * MiB and probabilities_bytes(4096) == 6 * GiB
assert 12 * probabilities_bytes(1024) == 4.5 * GiB and 12 * probabilities_bytes(4096) == 72 * GiB
assert logsumexp_bytes(1024) == 384 * 2**10 and logsumexp_bytes(4096) == 1.5 * MiB
for T in (1024, 4096):
    assert probabilities_bytes(T) == T * logsumexp_bytes(T)
assert probabilities_bytes(1024) / (probabilities_bytes(1024) + qkv_bytes(1024)) > 0.8
assert probabilities_bytes(4096) / (probabilities_bytes(4096) + qkv_bytes(4096)) > 0.95

# %% [markdown]
# The formulas are those of the real caches: at a small size, the arrays each cache holds.

# %%
q, k, v = random_heads(2, 3, 40, 8, np.float32)
_, plain_cache = attention_forward(fuse_heads(q, k, v), 3)
_, flash_cache = flash_attention_forward(q, k, v, block=16)
print(f"plain keeps att {plain_cache.att.shape}: {plain_cache.att.nbytes:,} bytes")
print(f"flash keeps L {flash_cache.logsumexp.shape}: {flash_cache.logsumexp.nbytes:,} bytes")
assert plain_cache.att.nbytes == 2 * 3 * 40 * 40 * FLOAT32
assert flash_cache.logsumexp.nbytes == 2 * 3 * 40 * FLOAT32

# %%
lengths = 2 ** np.arange(7, 15)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.loglog(lengths, [probabilities_bytes(T) / MiB for T in lengths], "o-", label="probabilities (B, H, T, T)")
ax.loglog(lengths, [qkv_bytes(T) / MiB for T in lengths], "s-", label="q, k, v (3, B, T, C)")
ax.loglog(lengths, [logsumexp_bytes(T) / MiB for T in lengths], "^-", label="flash's L (B, H, T)")
ax.set_xlabel("sequence length T")
ax.set_ylabel("MiB per layer")
ax.set_title("GPT-2 small attention, B = 8, float32")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## The online softmax, on one row
#
# One query row of attention is `out = sum_j p_j v_j` with `p_j = exp(s_j - m) / l`, where m is the
# row's largest score (subtracted so that no `exp` overflows) and `l = sum_j exp(s_j - m)`.
# Both m and l seem to need the whole row first. They do not: read the scores in chunks and keep
# the running max m, the running sum l and the running unnormalised output `acc = sum_j exp(s_j - m) v_j`.
# When a chunk brings a larger max m_new, every earlier term `exp(s_j - m)` must become
# `exp(s_j - m_new) = exp(s_j - m) exp(m - m_new)`: one factor rescales them all.
#
#     m_new = max(m, max_j s_j)                          (the chunk's scores s_j, values v_j)
#     l     = exp(m - m_new) l   + sum_j exp(s_j - m_new)
#     acc   = exp(m - m_new) acc + sum_j exp(s_j - m_new) v_j
#
# Start with m = -inf, l = 0, acc = 0; at the end `out = acc / l`, and `L = m + log l` is the
# row's log-sum-exp, from which any probability follows: `p_j = exp(s_j - L)`.
#
# Row t = 9 of head 0, with T = 12 and chunks of 4, done by hand:

# %%
q, k, v = random_heads(1, 1, 12, 8)
scale = 1 / math.sqrt(8)
t = 9
scores = (q[0, 0, t] * scale) @ k[0, 0, : t + 1].T  # (t + 1,): keys 0..t, the ones row t may see
values = v[0, 0, : t + 1]  # (t + 1, hs)

m, denominator, acc = -np.inf, 0.0, np.zeros(8)  # m, l and acc before any key
for start in range(0, t + 1, 4):
    chunk = slice(start, start + 4)
    m_new = max(m, scores[chunk].max())
    rescale = np.exp(m - m_new)  # 0 for the first chunk: exp(-inf)
    denominator = rescale * denominator + np.exp(scores[chunk] - m_new).sum()
    acc = rescale * acc + np.exp(scores[chunk] - m_new) @ values[chunk]
    m = m_new
    print(f"after keys {start}..{min(start + 3, t)}: m = {m:+.4f}, l = {denominator:.4f}")
out_row, L_row = acc / denominator, m + np.log(denominator)

# %% [markdown]
# The recurrence gives the softmax row of the plain attention, and the row's log-sum-exp; the
# library's `flash_attention`, with tiles of 4 keys, does the same for every row:

# %%
y, _, att, _ = scaled_dot_product_attention(q, k, v)
out_flash, L_flash = flash_attention(q, k, v, block=4)
assert np.allclose(out_row, y[0, 0, t], rtol=1e-13, atol=1e-13)
assert np.allclose(out_row, out_flash[0, 0, t], rtol=1e-13, atol=1e-13) and np.isclose(
    L_row, L_flash[0, 0, t]
)
assert np.allclose(np.exp(scores - L_row), att[0, 0, t, : t + 1], rtol=1e-13, atol=1e-13)
assert np.isclose(L_row, np.log(np.exp(scores).sum()), rtol=1e-13)
print(f"online: {np.round(out_row[:4], 6)}...\nplain:  {np.round(y[0, 0, t, :4], 6)}...")

# %% [markdown]
# The shift by the running max is what keeps it finite. With scores in the thousands a plain
# `exp` overflows (float64 overflows past e^709), and the recurrence does not:

# %%
big = 1000 * scores
with np.errstate(over="ignore"):
    assert np.isinf(np.exp(big)).any()
m, denominator = -np.inf, 0.0
for start in range(0, t + 1, 4):
    m_new = max(m, big[start : start + 4].max())
    denominator = np.exp(m - m_new) * denominator + np.exp(big[start : start + 4] - m_new).sum()
    m = m_new
L_big = m + np.log(denominator)
assert np.isfinite(L_big) and np.isclose(L_big, big.max() + np.log(np.exp(big - big.max()).sum()), rtol=1e-13)
print(f"log-sum-exp of scores up to {big.max():,.0f}: {L_big:,.4f}")

# %% [markdown]
# ## The tiled forward
#
# `flash_attention(q, k, v, block)` runs that recurrence for every row at once, over tiles of
# `block` keys and values. Causality saves work: key tile [start, end) is seen only by the queries
# from `start` on, so each tile's scores are computed for those queries alone, and only the square
# part on the diagonal needs the triangular mask. In the grid of (query tile, key tile) pairs, every
# tile above the diagonal is skipped:

# %%
T, block = 16, 4
n_tiles = T // block
query_tile, key_tile = np.meshgrid(range(n_tiles), range(n_tiles), indexing="ij")
# 2: a full tile below the diagonal, 1: a masked tile on it, 0: a skipped tile above it
tile_kind = np.where(key_tile < query_tile, 2, np.where(key_tile == query_tile, 1, 0))

fig, ax = plt.subplots(figsize=(3.6, 3.6))
ax.imshow(tile_kind, cmap="Blues", vmin=0, vmax=2.5)
for (i, j), kind in np.ndenumerate(tile_kind):
    label, color = (("skipped", "black"), ("masked", "black"), ("full", "white"))[kind]
    ax.text(j, i, label, color=color, ha="center", va="center", fontsize=8)
ax.set_xticks(
    range(n_tiles), [f"keys\n{j * block}-{j * block + block - 1}" for j in range(n_tiles)], fontsize=7
)
ax.set_yticks(
    range(n_tiles), [f"queries {i * block}-{i * block + block - 1}" for i in range(n_tiles)], fontsize=7
)
ax.set_title(f"T = {T}, block = {block}")
fig.tight_layout()

# %% [markdown]
# `count_matmuls` records every matrix product. The score products cover exactly the tiles on and
# below the diagonal, (n + 1) n / 2 of the n² tiles (10 of 16 here, about half for long sequences),
# and the forward makes two products per key tile, `q k^T` and `P v`:

# %%
q, k, v = random_heads(2, 3, T, 8)
with count_matmuls() as log:
    flash_attention(q, k, v, block)
score_entries = sum(math.prod(out[2:]) for a, _, out in log.products if a[-1] == 8)  # contracting over hs
assert len(log.products) == 2 * n_tiles
assert score_entries == (n_tiles + 1) * n_tiles // 2 * block * block
print(
    f"{len(log.products)} products; {score_entries} of T² = {T * T} scores computed per head "
    f"({(tile_kind > 0).sum()} of {n_tiles**2} tiles)"
)

# %% [markdown]
# The output equals the plain attention's, in float64 to rounding and in float32 to float32's
# precision, for lengths that are multiples of the tile and lengths that are not; L equals the
# log-sum-exp of the plain scores, computed here from `q k^T` directly.


# %%
def causal_logsumexp(q, k):
    """log sum_j exp(s_ij) over the keys each query may see, from the full (B, H, T, T) scores."""
    T = q.shape[2]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1]) + causal_bias(np, T, T, q.dtype)
    s_max = s.max(axis=-1, keepdims=True)
    return (s_max + np.log(np.exp(s - s_max).sum(axis=-1, keepdims=True)))[..., 0]  # (B, H, T)


print(f"{'T':>4} {'block':>5} {'float64 out':>12} {'float64 L':>10} {'float32 out':>12}")
for T, block in [(16, 4), (17, 4), (50, 16), (64, 64), (100, 32)]:
    q, k, v = random_heads(2, 3, T, 8)
    out, L = flash_attention(q, k, v, block)
    error64 = relative_error(out, scaled_dot_product_attention(q, k, v)[0])
    error_L = relative_error(L, causal_logsumexp(q, k))
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    out32, _ = flash_attention(q32, k32, v32, block)
    error32 = relative_error(out32, scaled_dot_product_attention(q32, k32, v32)[0])
    print(f"{T:>4} {block:>5} {error64:>12.1e} {error_L:>10.1e} {error32:>12.1e}")
    assert error64 < 1e-13 and error_L < 1e-13 and error32 < 1e-5 and out32.dtype == np.float32

# %% [markdown]
# ## The backward, derived
#
# Per tile the forward was `S = Q K^T / sqrt(hs)` (masked), `P = softmax(S)` row by row, `O = P V`.
# Given dO, the gradient of the loss with respect to O:
#
#     O = P V                 ->  dV = P^T dO,    dP = dO V^T
#     P = softmax(S), rows    ->  dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)
#     S = Q K^T / sqrt(hs)    ->  dQ = dS K / sqrt(hs),   dK = dS^T Q / sqrt(hs)
#
# Two facts make it tileable. The probabilities are recomputed from the saved L:
# `P_ij = exp(S_ij - L_i)`, one tile at a time. And the row sum in the softmax's backward needs
# no tile at all:
#
#     D_i = sum_k P_ik dP_ik = sum_k P_ik (dO_i . V_k) = dO_i . (sum_k P_ik V_k) = dO_i . O_i
#
# so `D = rowsum(dO * O)` is known before the loop, and `dS = P * (dP - D)`. Both facts, checked
# on the plain attention's own probabilities:

# %%
T = 20
q, k, v = random_heads(2, 3, T, 8)
dout = rng.standard_normal((2, 3, T, 8))
y, q_scaled, att, _ = scaled_dot_product_attention(q, k, v)
_, L = flash_attention(q, k, v, block=8)
recomputed = np.exp(q_scaled @ k.swapaxes(-1, -2) + causal_bias(np, T, T, q.dtype) - L[..., None])
dP = dout @ v.swapaxes(-1, -2)  # (B, H, T, T)
assert np.allclose(recomputed, att, rtol=1e-12, atol=1e-15)
assert np.allclose((att * dP).sum(axis=-1), (dout * y).sum(axis=-1), rtol=1e-12, atol=1e-12)
print("P = exp(S - L) and rowsum(P * dP) = rowsum(dO * O), to rounding")

# %% [markdown]
# `flash_attention_backward` loops over the key tiles again: for each, it recomputes S and P for the
# queries that see the tile, writes the tile's dK and dV, and adds the tile's share into dQ (a
# query sees many key tiles). Checked element by element against central finite differences in
# float64, for a length that is not a multiple of the tile:

# %%
q, k, v = random_heads(2, 2, 7, 3)
result = check_layer(
    partial(flash_attention_forward, block=3),
    flash_attention_backward,
    {"q": q, "k": k, "v": v},
    ("q", "k", "v"),
)
print(result)
result.assert_ok(1e-7)

# %% [markdown]
# And against the plain attention's backward (`attention_backward`, which uses the stored
# probabilities), on a larger problem:

# %%
T = 50
q, k, v = random_heads(2, 3, T, 8)
dout = rng.standard_normal((2, 3, T, 8))
_, flash_cache = flash_attention_forward(q, k, v, block=16)
flash_grads = flash_attention_backward(dout, flash_cache)
_, plain_cache = attention_forward(fuse_heads(q, k, v), 3)
plain_grads = split_heads(attention_backward(merge_heads(dout), plain_cache), 3)  # dq, dk, dv
for name, mine, plain in zip(("dq", "dk", "dv"), flash_grads, plain_grads):
    print(f"{name}: relative difference {relative_error(mine, plain):.1e}")
    assert relative_error(mine, plain) < 1e-13

# %% [markdown]
# ## What it saves and what it costs
#
# **Saved, measured.** `tracemalloc` sees NumPy's allocations. Over a forward and a backward at
# T = 1024 (B = 2, H = 4, hs = 16, float32, tiles of 64), we record the peak memory and what each
# cache holds between the two passes. The plain probabilities alone are 2 · 4 · 1024² · 4 bytes
# = 32 MiB; a flash tile of scores (all queries against 64 keys) is 16 times smaller.


# %%
def traced_bytes(run):
    """(the result of run(), bytes it still holds when it returns, peak bytes during it)."""
    tracemalloc.start()
    result = run()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, held, peak


B_m, H_m, T_m, hs_m, block_m = 2, 4, 1024, 16, 64
q, k, v = random_heads(B_m, H_m, T_m, hs_m, np.float32)
qkv, dout = fuse_heads(q, k, v), rng.standard_normal((B_m, H_m, T_m, hs_m)).astype(np.float32)
dout_merged = merge_heads(dout)

plain_cache, plain_held, plain_forward_peak = traced_bytes(lambda: attention_forward(qkv, H_m)[1])
_, _, plain_backward_peak = traced_bytes(lambda: attention_backward(dout_merged, plain_cache))
flash_cache, flash_held, flash_forward_peak = traced_bytes(
    lambda: flash_attention_forward(q, k, v, block_m)[1]
)
_, _, flash_backward_peak = traced_bytes(lambda: flash_attention_backward(dout, flash_cache))

att_bytes = B_m * H_m * T_m * T_m * 4
assert att_bytes == 32 * MiB and T_m // block_m == 16
print(f"{'':>6} {'held between passes':>20} {'forward peak':>13} {'backward peak':>14}")
for name, held, forward_peak, backward_peak in [
    ("plain", plain_held, plain_forward_peak, plain_backward_peak),
    ("flash", flash_held, flash_forward_peak, flash_backward_peak),
]:
    print(
        f"{name:>6} {held / MiB:>16.2f} MiB {forward_peak / MiB:>9.2f} MiB {backward_peak / MiB:>10.2f} MiB"
    )
assert plain_held >= att_bytes  # the probabilities are held between the passes
assert flash_held < att_bytes / 8  # flash holds its output and L: O(T); q, k, v it only references
assert flash_forward_peak < plain_forward_peak / 4 and flash_backward_peak < plain_backward_peak / 4

# %% [markdown]
# **Cost, counted.** The plain backward makes 4 products: one that forms a score-shaped matrix by
# contracting over the head size (`dP = dO V^T`) and three that contract over positions
# (dV, dQ, dK). The flash backward makes, per key tile, those same four *plus* the recomputed
# `S = Q K^T`: two score-shaped products and three others. We sort the products by the axis they
# contract over (head size, or positions):


# %%
def products_by_kind(run, hs):
    """(products contracting over the head size: scores, products contracting over positions)."""
    with count_matmuls() as log:
        run()
    over_head_size = sum(1 for a, _, _ in log.products if a[-1] == hs)
    return over_head_size, len(log.products) - over_head_size, log.flops


T, block, hs_c = 256, 32, 16  # hs differs from every tile width, so the two kinds cannot be confused
n_tiles = T // block
q, k, v = random_heads(2, 3, T, hs_c)
dout = rng.standard_normal((2, 3, T, hs_c))
_, plain_cache = attention_forward(fuse_heads(q, k, v), 3)
_, flash_cache = flash_attention_forward(q, k, v, block)

plain_scores, plain_others, plain_flops = products_by_kind(
    lambda: attention_backward(merge_heads(dout), plain_cache), hs_c
)
flash_scores, flash_others, flash_backward_flops = products_by_kind(
    lambda: flash_attention_backward(dout, flash_cache), hs_c
)
_, _, flash_forward_flops = products_by_kind(lambda: flash_attention(q, k, v, block), hs_c)
print(f"plain backward: {plain_scores} score-shaped product, {plain_others} others, in one piece")
print(
    f"flash backward: {flash_scores} score-shaped products, {flash_others} others, over {n_tiles} tiles: "
    f"{flash_scores // n_tiles} and {flash_others // n_tiles} per tile"
)
assert (plain_scores, plain_others) == (1, 3)
assert flash_scores == n_tiles * (plain_scores + 1)  # one more q k^T per tile: the recomputed scores
assert flash_others == n_tiles * plain_others

# %% [markdown]
# Every product of a tile has the same size (queries × tile width × hs), so in FLOPs the flash
# backward costs 5/4 of a backward over the same tiles with stored probabilities, and 5/2 of its own
# forward (2 products a tile). This NumPy plain attention computes all T² scores, masked ones
# included; flash skips the tiles above the diagonal, so here it is even cheaper in FLOPs than the
# plain backward. On a GPU this trade is the paper's point: a little more arithmetic for far less
# memory traffic, since the probabilities never travel to and from the GPU's main memory.

# %%
assert flash_backward_flops * 2 == 5 * flash_forward_flops
print(
    f"FLOP: flash forward {flash_forward_flops:,}, flash backward {flash_backward_flops:,} "
    f"({flash_backward_flops / flash_forward_flops:.1f}x its forward), plain backward {plain_flops:,} "
    f"(all T² scores)"
)
assert flash_backward_flops < plain_flops

# %% [markdown]
# ## Summary
#
# - Plain attention keeps its (B, H, T, T) probabilities for the backward: at T = 1024 for GPT-2
#   small with a batch of 8, 384 MiB a layer, 84% of what the attention keeps; at T = 4096, 6 GiB.
# - The online softmax reads a row's scores in chunks, keeping a running max, sum and output, and
#   rescales them by `exp(m - m_new)` whenever the max grows: the same numbers, never overflowing.
# - `flash_attention` runs it over key/value tiles, skipping every tile above the diagonal, and keeps
#   only the log-sum-exp L (B, H, T): T times less than the probabilities.
# - Its backward recomputes `P = exp(S - L)` tile by tile and uses `D = rowsum(dO * O)` for the
#   softmax's row sum, `dS = P * (dP - D)`; it passes the finite-difference check and equals the
#   plain backward.
# - The price is one more `q k^T` product per tile in the backward (5 products a tile instead of 4).
#   This module is the reference a GPU kernel will be checked against; no model calls it.
