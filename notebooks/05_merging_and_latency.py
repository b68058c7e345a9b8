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
# # 5. Merging and latency
#
# A LoRA layer computes `x W + b + s (x A^T) B^T`: two extra small matrix products per adapted
# layer. For inference they can be folded away, since `x W + s x A^T B^T = x (W + s A^T B^T)`:
# *merging* writes `W' = W + s A^T B^T` into the weight, and the model costs exactly what the base
# costs. This notebook merges and unmerges an adapter on the shipped base model, measures how exact
# that is in float16, float32 and float64, and times inference merged and unmerged.

# %%
# %matplotlib inline

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora.backend import count_matmuls
from minilora.fast.cpu.inference import use_one_blas_thread

blas_threads = use_one_blas_thread()  # as a training step: a Jupyter kernel starts with one per core

folio = ml.load_corpus("shakespeare_folio")
idx = folio.val[:64][None, :].astype(np.int64)  # one window of 64 bytes of held-out Folio text, (1, 64)


def relative_difference(a, reference):
    """max |a - reference| / max |reference|, in float64."""
    a, reference = np.asarray(a, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.max(np.abs(a - reference)) / np.max(np.abs(reference)))


# %% [markdown]
# ## Merge and unmerge
#
# An adapter of rank 8 on every linear layer of the shipped base. Merging is arithmetic and does not
# care how `lora_B` got its values, so instead of training we use `init="random"`, which draws
# `lora_B` non-zero (a trained adapter would merge the same way; notebook 4 trains some).

# %%
base = ml.load_model(ml.SHIPPED_BASE)  # float32
original = {name: value.copy() for name, value in base.params.items()}
model = ml.add_lora(
    base, ml.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init="random"), seed=0
)
print(ml.model_summary_line(model))

logits_unmerged = model.forward(idx)[0]
model.merge()  # W <- W + s A^T B^T, in place, for every adapted layer
logits_merged = model.forward(idx)[0]  # the forward now skips the adapter path
relative = relative_difference(logits_merged, logits_unmerged)
print(f"merged vs unmerged logits: max relative difference {relative:.1e}")
assert relative < 1e-5

# %% [markdown]
# Merging changed the weights in place (the LoRA model shares the base's arrays, as PEFT does).
# It is always an explicit call, and the model refuses to do it twice, which would add the
# update twice. `unmerge()` subtracts the update again; in floating point that restores the
# weights up to rounding.

# %%
name = "transformer.h.0.attn.c_attn.weight"
print(f"{name} moved by up to {np.max(np.abs(base.params[name] - original[name])):.3f} while merged")
try:
    model.merge()
except RuntimeError as err:
    print("merging twice:", err)
else:
    raise AssertionError("a second merge was accepted")

model.unmerge()
restored = max(relative_difference(base.params[k], original[k]) for k in original)
print(f"after unmerge: base weights restored to {restored:.1e} (relative)")
assert restored < 1e-6 and relative_difference(model.forward(idx)[0], logits_unmerged) < 1e-5

# %% [markdown]
# For deployment, `merge_and_unload()` returns a plain `GPT` with merged *copies* of the weights:
# the base's parameter count, no adapter, and the LoRA model is left untouched.

# %%
weights_before = {k: base.params[k].copy() for k in original}
merged_model = model.merge_and_unload()
print(
    f"merged model: {type(merged_model).__name__}, {merged_model.num_parameters():,} parameters "
    f"(the base: {base.num_parameters():,})"
)
assert type(merged_model) is ml.GPT and merged_model.num_parameters() == base.num_parameters()
assert relative_difference(merged_model.forward(idx)[0], logits_unmerged) < 1e-5
assert all(np.array_equal(base.params[k], weights_before[k]) for k in original)  # the base is untouched

# %% [markdown]
# ## How exact is a merge? float16, float32, float64
#
# Adding `s A^T B^T` to W rounds every entry to the weight's precision, and a forward pass with
# merged weights rounds differently from one with the adapter on the side. We build the same
# model and adapter in each precision (`load_model(..., dtype=...)`; `add_lora` follows the base's
# dtype) and measure three errors, each relative to the largest value involved:
#
# - **merged weight**: W' against `W + s A^T B^T` computed in extended precision (`np.longdouble`)
#   from the same stored numbers;
# - **logits**: the merged model's against the unmerged model's, both in that precision;
# - **unmerge**: the weights after a merge and an unmerge, against the originals.
#
# Each should be of the order of the precision's unit roundoff, `eps / 2`: 4.9e-4 for float16,
# 6.0e-8 for float32 and 1.1e-16 for float64. (NumPy's float16 matrix products are slow, so the
# window is short.)

# %%
dtypes = (np.float16, np.float32, np.float64)
errors = {}
for dtype in dtypes:
    model_d = ml.add_lora(
        ml.load_model(ml.SHIPPED_BASE, dtype=dtype),
        ml.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init="random"),
        seed=0,
    )
    s = model_d.lora_config.scaling
    modules = list(model_d.adapted_modules)
    before = {m: model_d.params[f"{m}.weight"].copy() for m in modules}
    factors = {
        m: (
            model_d.params[f"{m}.lora_A"].astype(np.longdouble),
            model_d.params[f"{m}.lora_B"].astype(np.longdouble),
        )
        for m in modules
    }
    exact = {m: before[m].astype(np.longdouble) + s * (factors[m][0].T @ factors[m][1].T) for m in modules}
    logits_u = model_d.forward(idx)[0]
    model_d.merge()
    logits_m = model_d.forward(idx)[0]
    weight_error = max(
        float(np.max(np.abs(model_d.params[f"{m}.weight"] - exact[m])) / np.max(np.abs(exact[m])))
        for m in modules
    )  # in extended precision
    model_d.unmerge()
    errors[np.dtype(dtype).name] = {
        "merged weight": weight_error,
        "logits": relative_difference(logits_m, logits_u),
        "unmerge": max(relative_difference(model_d.params[f"{m}.weight"], before[m]) for m in modules),
    }

print(f"{'':<9} {'unit roundoff':>14}" + "".join(f"{kind:>15}" for kind in errors["float32"]))
for dtype in dtypes:
    row = errors[np.dtype(dtype).name]
    print(
        f"{np.dtype(dtype).name:<9} {np.finfo(dtype).eps / 2:>14.1e}"
        + "".join(f"{v:>15.1e}" for v in row.values())
    )

# %%
for kind in errors["float32"]:
    e16, e32, e64 = (errors[name][kind] for name in ("float16", "float32", "float64"))
    assert e16 > e32 > e64, (kind, e16, e32, e64)
print("every error orders float16 > float32 > float64")
for dtype in dtypes:
    u, row = np.finfo(dtype).eps / 2, errors[np.dtype(dtype).name]
    assert row["merged weight"] < 2.5 * u and row["unmerge"] < 2.5 * u, (dtype, row)  # one rounding per entry
    assert 2 * u < row["logits"] < 100 * u, (dtype, row)  # accumulated through six blocks
    print(
        f"{np.dtype(dtype).name}: merged weight {row['merged weight'] / u:.1f} u, unmerge {row['unmerge'] / u:.1f} u, "
        f"logits {row['logits'] / u:.0f} u (u = unit roundoff)"
    )
assert errors["float32"]["logits"] < 1e-5 and 1e-3 < errors["float16"]["logits"] < 1e-2

# %%
fig, ax = plt.subplots(figsize=(8, 3.6))
kinds = list(errors["float32"])
width = 0.25
for i, dtype in enumerate(dtypes):
    name = np.dtype(dtype).name
    values = [max(errors[name][kind], 1e-20) for kind in kinds]  # an exact 0 would vanish on a log axis
    ax.bar(np.arange(len(kinds)) + (i - 1) * width, values, width, label=name)
    ax.axhline(np.finfo(dtype).eps / 2, color=f"C{i}", ls=":", lw=1)
ax.set_xticks(range(len(kinds)), kinds)
ax.set_yscale("log")
ax.set_ylabel("max relative error")
ax.set_title("merge errors by precision (dotted: unit roundoff)")
ax.legend()
fig.tight_layout()

# %% [markdown]
# The weight errors sit within 2.5 unit roundoffs (asserted): merging is one rounded addition per
# entry, and so is unmerging, which therefore does not give back the base weights exactly in any
# precision. The logits differ by more, 2 to 100 times the roundoff (asserted; the table has the
# factor for each precision), because six blocks of rounded products accumulate it, but in float32
# the merged model still agrees to about 1e-6. In float16, the precision many models are served
# in, a merged model differs from the adapter-on-the-side model by a few parts in a thousand, and
# a merge and an unmerge leave the weights off by about 1e-3 relative, which adds up if adapters
# are switched back and forth. So keep the float32 base, or the unmerged adapter, for switching.
#
# ## Latency: merged vs unmerged
#
# Per adapted layer and token the adapter adds `2 r (C_in + C_out)` FLOPs to the `2 C_in C_out`
# of the weight: for r = 8 on the shipped base's layers (C = 256), 4 to 6 % more, and two more
# matrix products, `x A^T` and `h B^T`. `count_matmuls` counts them exactly; the merged model must
# make exactly the base's products.

# %%
unmerged_r8 = model  # the float32 LoRA model from above, unmerged again
unmerged_r64 = ml.add_lora(
    base, ml.LoraConfig(r=64, lora_alpha=128, target_modules="all-linear", init="random")
)
contenders = {
    "base": base,
    "merged r=8": merged_model,
    "unmerged r=8": unmerged_r8,
    "unmerged r=64": unmerged_r64,
}
batch = folio.val[:256][None, :].astype(np.int64)  # one window of 256 bytes, (1, 256)
n_new = 32  # bytes generated one at a time with the key/value cache
N = batch.size  # tokens in the batched forward

counts = {}
for label, m in contenders.items():
    with count_matmuls() as forward_log:
        m.forward(batch)
    with count_matmuls() as generate_log:
        ml.generate(m, "KING.\n", max_new_tokens=n_new, seed=0)
    counts[label] = {
        "forward products": len(forward_log.products),
        "forward GFLOP": forward_log.flops / 1e9,
        "generate products": len(generate_log.products),
    }
    row = counts[label]
    print(
        f"{label:<13} forward of 1 x 256: {row['forward products']:>3} products, {row['forward GFLOP']:5.3f} GFLOP;"
        f"  generating {n_new} bytes: {row['generate products']:>5} products"
    )

# %%
n_adapted = len(unmerged_r8.adapted_modules)
assert counts["merged r=8"] == counts["base"]  # the merged model does exactly the base's work
for label, r in (("unmerged r=8", 8), ("unmerged r=64", 64)):
    extra = sum(2 * N * r * (C_in + C_out) for C_in, C_out in contenders[label].adapted_modules.values())
    assert counts[label]["forward products"] == counts["base"]["forward products"] + 2 * n_adapted
    assert round(1e9 * (counts[label]["forward GFLOP"] - counts["base"]["forward GFLOP"])) == extra
    assert counts[label]["generate products"] > counts["base"]["generate products"] * 1.5
extra_share = {
    label: counts[label]["forward GFLOP"] / counts["base"]["forward GFLOP"] - 1 for label in contenders
}
print(
    "extra FLOPs over the base: "
    + ", ".join(f"{label} {share:+.1%}" for label, share in extra_share.items())
    + f"; extra products per generated byte, unmerged: "
    f"{(counts['unmerged r=8']['generate products'] - counts['base']['generate products']) / n_new:.0f}"
)

# %% [markdown]
# Those are exact. In the batched forward the adapter's extra FLOPs are a few percent at r = 8.
# When generating, every step multiplies a single position, so the products are tiny and their
# number matters more than their FLOPs: the unmerged model makes more than 1.5x the base's calls.
#
# Time is another matter: on a shared machine a timing varies by more than these few percent
# from one run to the next. So each model is timed in 15 rounds, the models taking turns within
# a round (in a rotating order), and we report the median and the range (min to max) of the
# rounds, and, for each unmerged model, its time over the merged model's *in the same round*,
# which cancels some of what the machine was doing at that moment. A difference counts as measured
# only if the per-round ratio falls on the same side of 1 in so many rounds that fair coin flips
# would do that less than 1 % of the time (a two-sided sign test: 13 or more of 15).


# %%
def interleaved_timings(functions, rounds):
    """Seconds per round of each function; within a round they take turns, in a rotating order."""
    for function in functions.values():
        function()  # warm-up
    labels = list(functions)
    times = {label: [] for label in labels}
    for round_index in range(rounds):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            started = time.perf_counter()
            functions[label]()
            times[label].append(time.perf_counter() - started)
    return {label: np.array(values) for label, values in times.items()}


rounds = 15
timings = {
    "forward, 1 x 256": interleaved_timings(
        {label: (lambda m=m: m.forward(batch)) for label, m in contenders.items()}, rounds
    ),
    f"generate {n_new} bytes": interleaved_timings(
        {
            label: (lambda m=m: ml.generate(m, "KING.\n", max_new_tokens=n_new, seed=0))
            for label, m in contenders.items()
        },
        rounds,
    ),
}


def sign_test(ratios):
    """Two-sided sign test: how likely rounds split at least this unevenly around 1 by coin flips."""
    n, slower = len(ratios), int(np.sum(ratios > 1))
    k = max(slower, n - slower)
    return slower, min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n)


def verdict(ratios):
    slower, p = sign_test(ratios)
    if p >= 0.01:
        return f"slower in {slower} of {len(ratios)} rounds: no measured difference (sign test p = {p:.2f})"
    side = "slower" if slower > len(ratios) / 2 else "faster"
    return f"slower in {slower} of {len(ratios)} rounds: measurably {side} (sign test p = {p:.4f})"


for kind, times in timings.items():
    print(f"{kind}: ms per run, median [min, max] of {rounds} rounds")
    for label, seconds in times.items():
        low, median, high = 1000 * seconds.min(), 1000 * np.median(seconds), 1000 * seconds.max()
        line = f"  {label:<13} {median:7.1f} [{low:6.1f}, {high:6.1f}]"
        if label != "merged r=8":
            ratios = seconds / times["merged r=8"]
            line += (
                f"   vs merged, per round: {np.median(ratios):.3f} [{ratios.min():.3f}, {ratios.max():.3f}]"
                f"  -> {verdict(ratios)}"
            )
        print(line)
    spread = max((s.max() - s.min()) / np.median(s) for s in times.values())
    print(f"  widest range: {spread:.0%} of its median")

# %%
assert all(np.all(np.isfinite(s) & (s > 0)) for times in timings.values() for s in times.values())
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for ax, (kind, times) in zip(axes, timings.items()):
    for i, seconds in enumerate(times.values()):
        ax.plot(
            np.full(rounds, i) + np.linspace(-0.15, 0.15, rounds),
            1000 * seconds,
            ".",
            color=f"C{i}",
            alpha=0.6,
        )
        ax.hlines(1000 * np.median(seconds), i - 0.3, i + 0.3, color="k")
    ax.set_xticks(range(len(times)), list(times), fontsize=8)
    ax.set_title(f"{kind}: every round (dots), median (line)")
    ax.set_ylabel("ms")
fig.tight_layout()

# %% [markdown]
# How to read this (the numbers above are one run on a shared two-core machine; yours differ):
#
# - **Merged against base.** The merged model makes exactly the base's products, so any difference
#   between them is noise, or memory layout (the merged model holds fresh copies of the weights).
#   Its size here is a measure of how much noise a single comparison carries.
# - **Unmerged against merged.** The verdict printed for each pair says whether the difference
#   survived the noise in this run. The batched forward's extra work is a few percent of FLOPs,
#   which is often inside the rounds' spread; generating makes more than 1.5x the calls, each
#   with a fixed overhead, which makes a difference more likely to show, but on a loaded machine
#   it can drown too. We assert only what was counted, not any timing.
#
# For serving, merging removes the adapter's products exactly; whether that is worth it in time
# depends on how much the extra calls cost next to the rest (here: tiny models, one token at a
# time, where per-call overhead matters most). Adapters stay unmerged when one base serves many
# of them, or while they are being trained.
#
# ## Summary
#
# - `merge()` folds `s A^T B^T` into W in place, `unmerge()` takes it out again, and
#   `merge_and_unload()` returns a plain GPT; merging twice is refused.
# - Merge errors follow the precision: float16 > float32 > float64, within 2.5 unit roundoffs
#   for the weights and 2 to 100 times that for the logits; an unmerge restores the base only up
#   to one rounding per entry, about 1e-3 relative in float16.
# - Counted exactly: a merged model makes the base's matrix products; an unmerged one makes two
#   more per adapted layer in every forward (a few percent more FLOPs at r = 8, more at r = 64),
#   and more than 1.5x the base's products when generating one byte at a time.
# - Timed: medians and ranges over interleaved rounds, and per-round ratios to the merged model;
#   a difference is called measured only if a sign test over the rounds gives p < 0.01. On a busy
#   machine the forward's few percent are not; see the verdicts printed above for this run.
