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
# # 1. LoRA from scratch, step by step
#
# One linear layer, nothing else. We write LoRA's forward pass, derive its backward pass by hand
# (the gradients of the two factors and of the input), check the derivation against minilora's
# `lora.py` and against finite differences, and then look at three things that surprise people:
# why `lora_B = 0` at the start makes the gradient of `lora_A` exactly zero, what the rank limits,
# and what the scaling `lora_alpha / r` does to a training step.
#
# Notation (as in minilora): a linear layer is `y = x W + b` with `W` of shape (C_in, C_out),
# GPT-2's layout. LoRA adds a low-rank update:
#
# $$ y = x W + b + s \,(x A^\top) B^\top, \qquad A: (r, C_\text{in}),\quad B: (C_\text{out}, r),\quad s = \alpha / r $$
#
# In code the factors are `lora_A` and `lora_B` (PEFT's names and layout): a bare `B` is the batch size.

# %%
# %matplotlib inline

# %%
import matplotlib.pyplot as plt
import numpy as np

from minilora.fast.cpu.inference import use_one_blas_thread
from minilora.gradcheck import check_layer
from minilora.lora.config import LoraConfig
from minilora.lora.init import init_lora_factors
from minilora.lora.layer import lora_delta_weight, lora_linear_backward, lora_linear_forward, lora_scaling
from minilora.optim import AdamW

blas_threads = use_one_blas_thread()  # as a training step: a Jupyter kernel starts with one per core

# %% [markdown]
# ## The forward pass
#
# A batch of B sequences of T positions, C_in input channels, C_out output channels and rank r.
# Everything is float64 so that finite differences later are accurate. Both factors are random and
# non-zero here: at LoRA's real initialisation `lora_B` is zero, which would hide half of the
# gradient paths (we come back to that below).

# %%
rng = np.random.default_rng(0)
B, T, C_in, C_out, r = 2, 3, 6, 4, 2
lora_alpha = 4.0
s = lora_scaling(r, lora_alpha)  # alpha / r

x = rng.standard_normal((B, T, C_in))
W = rng.standard_normal((C_in, C_out))  # the frozen weight
b = rng.standard_normal(C_out)  # its bias
lora_A = rng.standard_normal((r, C_in))
lora_B = rng.standard_normal((C_out, r))
print(f"x {x.shape}, W {W.shape}, b {b.shape}, lora_A {lora_A.shape}, lora_B {lora_B.shape}, s = {s}")

# %% [markdown]
# The adapter path first squeezes each input row down to r numbers, `h = x A^T`, then expands them
# to C_out, `h B^T`, and scales by s.

# %%
h = x @ lora_A.T  # (B, T, r): the low-rank activation
y = x @ W + b + s * (h @ lora_B.T)  # (B, T, C_out)
print("h", h.shape, " y", y.shape)

y_lib, cache = lora_linear_forward(x, W, b, lora_A, lora_B, s)
assert np.allclose(y, y_lib, rtol=1e-13, atol=1e-13)
print("hand-written forward == minilora.lora.layer.lora_linear_forward")

# %% [markdown]
# The two paths add up to one linear layer with the weight `W + s A^T B^T`. That matrix, the update
# `ΔW = s A^T B^T`, has shape (C_in, C_out) like W but rank at most r, and it is stored as
# r (C_in + C_out) numbers instead of C_in C_out. Folding it into W is what *merging* means
# (notebook 5).

# %%
delta_W = s * lora_A.T @ lora_B.T  # (C_in, C_out)
assert np.allclose(delta_W, lora_delta_weight(lora_A, lora_B, s))
assert np.allclose(y, x @ (W + delta_W) + b)
assert np.linalg.matrix_rank(delta_W) == r
print(
    f"ΔW: shape {delta_W.shape}, rank {np.linalg.matrix_rank(delta_W)}; "
    f"{r * (C_in + C_out)} numbers in lora_A and lora_B, {C_in * C_out} in a full matrix"
)

# %% [markdown]
# ## The backward pass, derived
#
# Let L be the loss and `dout = dL/dy`, shape (B, T, C_out). Flatten the batch and time axes into
# N = B·T rows, indexed by n. Written out entry by entry, the forward pass is
#
# $$ h_{nk} = \sum_i x_{ni} A_{ki}, \qquad y_{nj} = \sum_i x_{ni} W_{ij} + b_j + s \sum_k h_{nk} B_{jk}. $$
#
# Each gradient is the chain rule applied to one of those sums:
#
# - `lora_B` appears once, multiplied by `s h`: $\; dB_{jk} = s \sum_n \text{dout}_{nj} h_{nk}$, i.e.
#   **dB = s dout^T h**, (C_out, N) @ (N, r).
# - `h` receives gradient through B: $\; dh_{nk} = s \sum_j \text{dout}_{nj} B_{jk}$, i.e. **dh = s dout B**,
#   (N, C_out) @ (C_out, r).
# - `lora_A` appears in h, multiplied by x: $\; dA_{ki} = \sum_n dh_{nk} x_{ni}$, i.e. **dA = dh^T x**,
#   (r, N) @ (N, C_in).
# - x feeds both paths, so its gradient is a sum: **dx = dout W^T + dh A**.
# - The bias: **db = sum over rows of dout**.
#
# The frozen weight's own gradient, `dW = x^T dout`, would be a (C_in, N) @ (N, C_out) product.
# LoRA never forms it: that is the saving. W is still *used* (in dx), just never *updated*.


# %%
def lora_linear_backward_by_hand(dout, x, W, b, lora_A, lora_B):
    """dx, db, dA, dB of y = x W + b + s (x A^T) B^T, from the derivation above."""
    x_rows = x.reshape(-1, C_in)  # (N, C_in)
    dout_rows = dout.reshape(-1, C_out)  # (N, C_out)
    h_rows = x_rows @ lora_A.T  # (N, r), recomputed: it is cheap
    dB = s * dout_rows.T @ h_rows  # (C_out, r)
    dh = s * dout_rows @ lora_B  # (N, r)
    dA = dh.T @ x_rows  # (r, C_in)
    dx = (dout_rows @ W.T + dh @ lora_A).reshape(x.shape)  # (B, T, C_in): base path + adapter path
    db = dout_rows.sum(axis=0)  # (C_out,)
    return dx, db, dA, dB


dout = rng.standard_normal(y.shape)  # a random upstream gradient, as a gradient check uses
dx, db, dA, dB = lora_linear_backward_by_hand(dout, x, W, b, lora_A, lora_B)
dx_lib, dW_lib, db_lib, dA_lib, dB_lib = lora_linear_backward(dout, cache)

for name, mine, theirs in [("dx", dx, dx_lib), ("db", db, db_lib), ("dA", dA, dA_lib), ("dB", dB, dB_lib)]:
    print(f"{name}: shape {mine.shape}, max |hand - library| = {np.max(np.abs(mine - theirs)):.1e}")
    assert mine.shape == theirs.shape and np.allclose(mine, theirs, rtol=1e-12, atol=1e-12)
assert dW_lib is None  # the frozen weight's gradient was never computed
print("dW from the library:", dW_lib)

# %% [markdown]
# ## Checked by finite differences
#
# Agreeing with the library only shows that we made the same mistakes. An independent check: a
# gradient is a derivative, so nudging one entry of `lora_A` by ±ε must change
# `f = sum(y * dout)` by about ±ε times that entry of dA (central differences are accurate to
# O(ε²); in float64 with ε = 1e-6 a correct gradient agrees to about 1e-9).


# %%
def objective():
    return np.sum(lora_linear_forward(x, W, b, lora_A, lora_B, s)[0] * dout)


eps, (k, i) = 1e-6, (1, 4)
saved = lora_A[k, i]
lora_A[k, i] = saved + eps
f_plus = objective()
lora_A[k, i] = saved - eps
f_minus = objective()
lora_A[k, i] = saved
numeric = (f_plus - f_minus) / (2 * eps)
print(f"dA[{k}, {i}]: derived {dA[k, i]:.10f}, finite difference {numeric:.10f}")
assert abs(numeric - dA[k, i]) < 1e-7 * max(1.0, abs(dA[k, i]))

# %% [markdown]
# `minilora.gradcheck.check_layer` does the same for every entry of every tensor (with a random
# upstream gradient of its own) and reports the worst relative error per tensor. We check both the
# derivation above and the library's backward, and require 1e-7, the tolerance of minilora's layer
# tests.

# %%
inputs = {"x": x, "W": W, "b": b, "lora_A": lora_A, "lora_B": lora_B}


def forward(x, W, b, lora_A, lora_B):
    return lora_linear_forward(x, W, b, lora_A, lora_B, s)


def backward_by_hand(dout, cache):
    return lora_linear_backward_by_hand(dout, **inputs)


hand = check_layer(forward, backward_by_hand, inputs, ("x", "b", "lora_A", "lora_B"))
library = check_layer(forward, lora_linear_backward, inputs, ("x", None, "b", "lora_A", "lora_B"))
print("by hand:\n" + str(hand) + "\nlibrary:\n" + str(library))
hand.assert_ok(1e-7)
library.assert_ok(1e-7)

# %% [markdown]
# ## Why `lora_B = 0` at the start makes dA exactly zero
#
# LoRA initialises `lora_A` randomly and `lora_B` to zero, so the update `s A^T B^T` is zero and
# training starts *exactly* at the pretrained model. Look at the derivation: `dh = s dout B`, and
# `dA = dh^T x`. With B = 0, dh = 0 and therefore dA = 0, whatever the data. On the first step only
# `lora_B` moves; `dB = s dout^T h` is not zero because `h = x A^T` is not.
#
# Here is minilora's real initialisation (`init_lora_factors`, PEFT's default: A uniform in
# ±1/sqrt(C_in), B zero) for one module:

# %%
adapter = init_lora_factors(
    LoraConfig(r=r, lora_alpha=lora_alpha), {"layer": (C_in, C_out)}, seed=0, dtype=np.float64
)
A0, B0 = adapter["layer.lora_A"], adapter["layer.lora_B"]
y0, cache0 = lora_linear_forward(x, W, b, A0, B0, s)
assert np.array_equal(y0, x @ W + b)  # exactly the frozen layer
_, _, _, dA0, dB0 = lora_linear_backward(dout, cache0)
print(
    "at init: max |dA| =",
    np.max(np.abs(dA0)),
    "  nonzero entries of dB:",
    np.count_nonzero(dB0),
    "of",
    dB0.size,
)
assert np.all(dA0 == 0) and np.count_nonzero(dB0) == dB0.size

# %% [markdown]
# After one step on B, `lora_B` is no longer zero and A starts receiving gradient. (If *both*
# factors started at zero, both gradients would be zero forever: a stationary point. That is why
# one factor must be random.)

# %%
B1 = B0 - 0.1 * dB0  # one plain gradient step on lora_B
_, _, _, dA1, _ = lora_linear_backward(dout, lora_linear_forward(x, W, b, A0, B1, s)[1])
print("after one step on B: max |dA| =", np.max(np.abs(dA1)))
assert np.all(np.abs(dA1) > 0)

zeros_A = np.zeros_like(A0)
_, _, _, dA_both, dB_both = lora_linear_backward(dout, lora_linear_forward(x, W, b, zeros_A, B0, s)[1])
assert np.all(dA_both == 0) and np.all(dB_both == 0)
print("with A = 0 and B = 0 both gradients are exactly zero: training could never start")

# %% [markdown]
# ## What the rank limits
#
# Whatever values training gives the factors, `ΔW = s A^T B^T` is a product through an r-dimensional
# bottleneck, so its rank is at most r. Below, random factors for a 64 x 96 matrix: the rank of ΔW
# is exactly r, and the trainable numbers grow linearly in r while a full matrix would have
# 64 · 96 = 6,144.

# %%
C_in_big, C_out_big = 64, 96
for rank in (1, 2, 4, 8, 16):
    A_r, B_r = rng.standard_normal((rank, C_in_big)), rng.standard_normal((C_out_big, rank))
    update = lora_delta_weight(A_r, B_r, lora_scaling(rank, 16))
    print(
        f"r = {rank:2d}: rank of ΔW = {np.linalg.matrix_rank(update):2d}, "
        f"trainable numbers r (C_in + C_out) = {rank * (C_in_big + C_out_big):5,}"
    )
    assert np.linalg.matrix_rank(update) == rank

# %% [markdown]
# ## What the scaling does
#
# The update is multiplied by s, and so are both factors' gradients (`dB = s dout^T h`). With Adam
# (what everyone trains LoRA with) the size of a step no longer depends on the gradient's size: the
# very first Adam step moves every entry of `lora_B` by exactly ±lr. What changes with r is how many
# such entries there are, and how much s shrinks them.
#
# The experiment: one layer of 256 channels, a batch of 512 random rows, one step of minilora's
# AdamW from the real initialisation, for ranks 1 to 128. We measure how far the layer's output
# moves (root mean square of the change) and how much the first-order loss on this batch drops,
# `-sum(dout * Δy)`, under the two common scalings:
#
# - LoRA's `s = alpha / r` (Hu et al.): the r new directions each get weight 1/r.
# - rsLoRA's `s = alpha / sqrt(r)` (Kalajdzievski, 2023).

# %%
N, C = 512, 256
x_big = rng.standard_normal((N, C))
dout_big = rng.standard_normal((N, C))
ranks = [1, 2, 4, 8, 16, 32, 64, 128]


def first_adam_step(rank, use_rslora, alpha=16.0, lr=1e-3):
    """(rms of the output change, first-order loss drop) after one AdamW step from LoRA's init."""
    scaling = lora_scaling(rank, alpha, use_rslora)
    tensors = init_lora_factors(LoraConfig(r=rank), {"m": (C, C)}, seed=rank, dtype=np.float64)
    params = {"lora_A": tensors["m.lora_A"], "lora_B": tensors["m.lora_B"]}
    zero_W = np.zeros((C, C))  # only the adapter's contribution matters here
    _, cache = lora_linear_forward(x_big, zero_W, None, params["lora_A"], params["lora_B"], scaling)
    _, _, _, dA, dB = lora_linear_backward(dout_big, cache)
    AdamW(params, ["lora_A", "lora_B"], lr=lr, weight_decay=0.0).step({"lora_A": dA, "lora_B": dB})
    delta_y, _ = lora_linear_forward(x_big, zero_W, None, params["lora_A"], params["lora_B"], scaling)
    return float(np.sqrt(np.mean(delta_y**2))), float(-np.sum(dout_big * delta_y))


results = {
    name: np.array([first_adam_step(rank, rs) for rank in ranks])
    for name, rs in (("alpha / r", False), ("alpha / sqrt(r)  (rsLoRA)", True))
}

fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for name, values in results.items():
    axes[0].loglog(ranks, values[:, 0], "o-", label=name)
    axes[1].loglog(ranks, values[:, 1], "o-", label=name)
axes[0].set(
    xlabel="rank r", ylabel="rms change of the output", title="how far one Adam step moves the output"
)
axes[1].set(xlabel="rank r", ylabel="first-order loss drop", title="how much it lowers this batch's loss")
for ax in axes:
    ax.set_xticks(ranks, [str(rank) for rank in ranks])
    ax.grid(alpha=0.3, which="both")
    ax.legend()
fig.tight_layout()

# %% [markdown]
# With `alpha / r`, the output moves less as r grows, as 1/sqrt(r): r independent ±lr entries add
# up to about sqrt(r) · lr, and s divides by r. The loss drop on the batch stays about constant,
# which is the original argument for `alpha / r`: change r and you need not retune the learning
# rate. rsLoRA's `alpha / sqrt(r)` instead keeps the output's movement the same at every rank, so
# a larger rank can learn more per step (its loss drop grows as sqrt(r)); with `alpha / r`, the
# extra capacity of a large rank is damped unless alpha grows with it. In practice people
# set `lora_alpha = 2 r` or use rsLoRA for large ranks.

# %%
standard, rslora = results["alpha / r"], results["alpha / sqrt(r)  (rsLoRA)"]
shrink = standard[0, 0] / standard[-1, 0]  # r = 1 over r = 128
print(
    f"alpha / r: the output change shrinks {shrink:.1f}x from r = 1 to r = 128 (sqrt(128) = {np.sqrt(128):.1f}); "
    f"loss drop ranges {standard[:, 1].min():.1f} .. {standard[:, 1].max():.1f}"
)
print(f"rsLoRA:    the output change ranges {rslora[:, 0].min():.2e} .. {rslora[:, 0].max():.2e}")
assert 0.5 * np.sqrt(128) < shrink < 2 * np.sqrt(128)
assert standard[:, 1].max() / standard[:, 1].min() < 1.5
assert rslora[:, 0].max() / rslora[:, 0].min() < 1.5

# %% [markdown]
# ## Summary
#
# - LoRA's layer is `y = x W + b + s (x A^T) B^T`; the update `s A^T B^T` has rank ≤ r and costs
#   r (C_in + C_out) trainable numbers.
# - Its backward is three small products, `dB = s dout^T h`, `dh = s dout B`, `dA = dh^T x`, plus
#   `dh A` added to dx; the frozen weight's gradient is never formed. The derivation matches
#   `minilora.lora.layer` and finite differences to better than 1e-7.
# - At the standard initialisation `lora_B = 0`, so the model starts exactly at the base and dA is
#   exactly zero on the first step; B moves first.
# - The scaling sets how strongly each step changes the output: `alpha / r` keeps the first step's
#   loss drop constant across ranks, rsLoRA keeps the size of the output change constant.
#
# Next: notebook 2 puts this layer inside a transformer.
