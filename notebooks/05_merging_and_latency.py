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
import time

import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora.backend import count_matmuls

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
# The weight errors sit right at the unit roundoff: merging is one rounded addition per entry. The
# logits differ by more, 10 to 20 times the roundoff, because six blocks of rounded products
# accumulate it, but in float32 the merged model still agrees to about 1e-6. In float16, the
# precision many models are served in, a merged model differs from the adapter-on-the-side model
# by a few parts in a thousand, and merge followed by unmerge does *not* give back the base
# weights exactly. So keep the float32 base, or the unmerged adapter, if you need to switch
# adapters back and forth.
#
# ## Latency: merged vs unmerged
#
# Per adapted layer and token the adapter adds `2 r (C_in + C_out)` multiply-adds to the
# `2 C_in C_out` of the weight: for r = 8 on the shipped base's layers (C = 256), 4 to 6 % more.
# `count_matmuls` counts them exactly; the merged model must make exactly the base's products.

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
batch = folio.val[: 2 * 256].reshape(2, 256).astype(np.int64)  # (2, 256)

counts = {}
for label, m in contenders.items():
    with count_matmuls() as log:
        m.forward(batch)
    counts[label] = (len(log.products), log.flops)
    print(
        f"{label:<13} {len(log.products):>4} matrix products, {log.flops / 1e9:6.2f} GFLOP per forward of 2 x 256"
    )
assert counts["merged r=8"] == counts["base"]
n_adapted = len(unmerged_r8.adapted_modules)
assert counts["unmerged r=8"][0] == counts["base"][0] + 2 * n_adapted  # x A^T and h B^T per adapted layer

# %% [markdown]
# Now the clock: a batched forward (2 x 256 bytes), and generating 64 bytes one at a time with the
# key/value cache, where each step is a handful of small products and the adapter's two extra
# calls per layer weigh more. On a shared machine single timings are noisy, so the models take
# turns, each is run several times, and we keep each one's fastest run (as `timeit` advises).
# Read the ratios, not the digits.


# %%
def fastest_seconds(functions, repeats):
    """The fastest of ``repeats`` timed runs of each function, run in turns so a busy moment hits all alike."""
    for function in functions.values():
        function()  # warm-up
    times = {label: [] for label in functions}
    for _ in range(repeats):
        for label, function in functions.items():
            started = time.perf_counter()
            function()
            times[label].append(time.perf_counter() - started)
    return {label: min(values) for label, values in times.items()}


forward_times = fastest_seconds(
    {label: (lambda m=m: m.forward(batch)) for label, m in contenders.items()}, repeats=7
)
generate_times = fastest_seconds(
    {
        label: (lambda m=m: ml.generate(m, "KING.\n", max_new_tokens=64, seed=0))
        for label, m in contenders.items()
    },
    repeats=5,
)
timings = {
    label: {"forward, 2 x 256": forward_times[label], "generate 64 bytes": generate_times[label]}
    for label in contenders
}
for label, row in timings.items():
    print(f"{label:<13}" + "".join(f"  {kind}: {1000 * seconds:6.1f} ms" for kind, seconds in row.items()))

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for ax, kind in zip(axes, timings["base"]):
    values = [1000 * timings[label][kind] for label in contenders]
    ax.bar(list(contenders), values, color=["C7", "C2", "C1", "C3"])
    ax.set_title(kind)
    ax.set_ylabel("ms (fastest run)")
    ax.tick_params(axis="x", labelsize=8)
fig.tight_layout()

# %% [markdown]
# The merged model does exactly the base's work, so it runs at the base's speed (within timing
# noise). The unmerged adapter costs extra time, more than its share of FLOPs suggests, because
# every adapted layer makes two more small, poorly-shaped products (each a separate call, with
# its own overhead), and the larger rank costs more again. That is why adapters are merged for
# serving, and kept separate when one base serves many adapters or when the adapter is still
# being trained.
#
# ## Summary
#
# - `merge()` folds `s A^T B^T` into W in place, `unmerge()` takes it out again, and
#   `merge_and_unload()` returns a plain GPT; merging twice is refused.
# - Merge errors follow the precision: float16 > float32 > float64, each near its unit roundoff
#   for the weights and 10 to 20 times that for the logits; in float16 an unmerge does not
#   restore the base exactly.
# - A merged model makes exactly the base's matrix products; an unmerged one makes two more per
#   adapted layer and is slower, most visibly when generating token by token.
