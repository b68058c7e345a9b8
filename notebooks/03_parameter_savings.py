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
# # 3. Parameter savings, and what they buy
#
# LoRA trains `lora_A` (r, C_in) and `lora_B` (C_out, r) instead of a (C_in, C_out) weight:
# **r (C_in + C_out)** numbers per adapted matrix instead of C_in C_out. This notebook counts what
# that means, and then follows the saving to the three places it is supposed to pay off:
#
# - **storage**: an adapter file against a copy of the model, for one task and for N tasks;
# - **memory**: everything a training step holds, weights, gradients, optimiser state *and the
#   activations*, from minilora's memory ledger and measured with `tracemalloc`;
# - **compute**: the matrix products of a training step, counted.
#
# It also reproduces the LoRA paper's GPT-3 175B figures from their formulas and says which
# assumptions they rest on, and notes where minilora's adapter on GPT-2's fused `c_attn` differs
# from the paper's separate adapters on W_q and W_v. Every number the text relies on is asserted
# against a formula or a measurement, with the margin stated.

# %%
# %matplotlib inline

# %%
import math
import tempfile
import tracemalloc
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora.backend import count_matmuls
from minilora.fast.cpu.inference import use_one_blas_thread
from minilora.fast.distributed.mpi_step import MpiStep
from minilora.fast.distributed.traffic import SMOLLM2_SHAPE, step_bytes, traffic_table
from minilora.fast.distributed.world import World
from minilora.lab.bench import step_flops
from minilora.lab.memory import format_bytes, memory_ledger
from minilora.lora.accounting import format_table, lora_parameter_table, lora_trainable_count
from minilora.lora.layer import lora_delta_weight
from minilora.optim import AdamW
from minilora.training.step import train_step

blas_threads = use_one_blas_thread()  # as a training step: a Jupyter kernel starts with one per core

# %% [markdown]
# ## The models
#
# minilora's presets (byte vocabulary, V = 256), the shipped Shakespeare base, and GPT-2's three
# public sizes with their real vocabulary (50,257 tokens) and context (1,024). A model's size is
# the sum over `parameter_shapes`, which names every tensor like the Hugging Face state dict; the
# GPT-2 counts must equal the published ones (the output head is tied to the embedding, so it adds
# nothing).


# %%
def gpt2(n_layer, n_head, n_embd):
    return ml.GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, vocab_size=50257)


models = {
    "tiny": ml.get_preset("tiny"),
    "small": ml.get_preset("small"),
    "shipped base": ml.load_model(ml.SHIPPED_BASE).config,
    "medium": ml.get_preset("medium"),
    "gpt2s (V=256)": ml.get_preset("gpt2s"),
    "GPT-2 small": gpt2(12, 12, 768),
    "GPT-2 medium": gpt2(24, 16, 1024),
    "GPT-2 large": gpt2(36, 20, 1280),
}


def model_size(config):
    return sum(math.prod(shape) for shape in config.parameter_shapes().values())


print(f"{'model':<14} {'layers':>6} {'C':>5} {'V':>6} {'parameters':>13}")
for name, config in models.items():
    print(
        f"{name:<14} {config.n_layer:>6} {config.n_embd:>5} {config.vocab_size:>6} {model_size(config):>13,}"
    )

published = {"GPT-2 small": 124_439_808, "GPT-2 medium": 354_823_168, "GPT-2 large": 774_030_080}
for name, count in published.items():
    assert model_size(models[name]) == count, name

# %% [markdown]
# ## Per adapted matrix: r (C_in + C_out)
#
# A block has four linear layers. With C channels their weights are `attn.c_attn` (C, 3C) (q, k
# and v side by side), `attn.c_proj` (C, C), `mlp.c_fc` (C, 4C) and `mlp.c_proj` (4C, C). At rank r
# the adapters cost 4rC, 2rC, 5rC and 5rC: 16 rC per block for all four, 6 rC for the two attention
# ones. For GPT-2 small's `c_attn` at r = 8, that is 8 (768 + 2304) = 24,576 numbers instead of
# 1,769,472, 1.4 % of the matrix. minilora's `lora_parameter_table` lists the same per module:

# %%
gpt2_small = models["GPT-2 small"]
print(format_table(lora_parameter_table(ml.LoraConfig(r=8, target_modules=["c_attn"]), gpt2_small)[:3]))
print("...")

# %% [markdown]
# The check, for every model, rank and choice of modules: each row of the table is r (C_in + C_out)
# with the shapes derived from C above, and the total is n_layer times the per-block sum.

# %%
ranks = [1, 2, 4, 8, 16, 32, 64]
targets = {"attention (c_attn, attn.c_proj)": ["c_attn", "attn.c_proj"], "all linear layers": "all-linear"}


def expected_shapes(C):
    return {
        "attn.c_attn": (C, 3 * C),
        "attn.c_proj": (C, C),
        "mlp.c_fc": (C, 4 * C),
        "mlp.c_proj": (4 * C, C),
    }


n_rows = 0
for config in models.values():
    C = config.n_embd
    for r in ranks:
        for target in targets.values():
            lora_config = ml.LoraConfig(r=r, target_modules=target)
            rows = lora_parameter_table(lora_config, config)
            for row in rows:
                C_in, C_out = expected_shapes(C)[row["module"].split(".", 3)[3]]
                assert row["weight_shape"] == (C_in, C_out) and row["adapter_params"] == r * (C_in + C_out), (
                    row
                )
            per_block = 6 * r * C if target != "all-linear" else 16 * r * C
            assert lora_trainable_count(lora_config, config) == config.n_layer * per_block
            n_rows += len(rows)
print(f"{n_rows:,} adapted matrices checked: each has r (C_in + C_out) trainable parameters")

# %% [markdown]
# Counting from shapes is one thing; a built model must agree. For the models small enough to
# build here, `add_lora` makes the real tensors: their shapes are (r, C_in) and (C_out, r), and
# the model's trainable parameters are exactly the count.

# %%
for name in ("tiny", "small", "shipped base"):
    config = models[name]
    base = ml.GPT(config, ml.init_params(config, seed=0))
    for r in (1, 8):
        lora_config = ml.LoraConfig(r=r, target_modules="all-linear")
        lora_model = ml.add_lora(base, lora_config)
        for module, (C_in, C_out) in expected_shapes(config.n_embd).items():
            assert lora_model.params[f"transformer.h.0.{module}.lora_A"].shape == (r, C_in)
            assert lora_model.params[f"transformer.h.0.{module}.lora_B"].shape == (C_out, r)
        assert lora_model.num_parameters(trainable_only=True) == lora_trainable_count(lora_config, config)
    print(f"{name:<13} {ml.model_summary_line(lora_model)}")

medium = models["medium"]
assert lora_trainable_count(ml.LoraConfig(r=8, target_modules=["c_attn", "attn.c_proj"]), medium) == 110_592

# %% [markdown]
# ## Against model size and rank
#
# Per matrix the share is r (C_in + C_out) / (C_in C_out), about r / C for square-ish matrices: it
# grows linearly with the rank and *shrinks* as models get wider. Embeddings, which LoRA leaves
# alone here, lower it further for models with a large vocabulary.

# %%
table_models = ["small", "shipped base", "medium", "GPT-2 small", "GPT-2 medium", "GPT-2 large"]
shares = {
    (target_name, name): [
        100
        * lora_trainable_count(ml.LoraConfig(r=r, target_modules=target), models[name])
        / model_size(models[name])
        for r in ranks
    ]
    for target_name, target in targets.items()
    for name in table_models
}
print(f"{'trainable % at rank r':<32}" + "".join(f"{r:>8}" for r in ranks))
for target_name in targets:
    print(target_name)
    for name in table_models:
        print(f"  {name:<30}" + "".join(f"{share:>8.3f}" for share in shares[target_name, name]))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for ax, target_name in zip(axes, targets):
    for name in table_models:
        label = f"{name} ({model_size(models[name]) / 1e6:.1f}M)"
        ax.loglog(ranks, shares[target_name, name], "o-", label=label)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="rank r", title=target_name)
    ax.grid(alpha=0.3, which="both")
axes[0].set_ylabel("trainable parameters, % of the model")
axes[1].legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## Storage: one adapter, and adapters for N tasks
#
# An adapter is saved alone: `adapter.safetensors` holds only `lora_A` and `lora_B`, 4 bytes per
# trainable parameter in float32 plus a small header, and `adapter_config.json` beside it holds the
# config and the fingerprint of the base it belongs to. Here are the real files for the shipped
# base at r = 8 on every linear layer, as the demo trains it, saved for four "tasks" (four seeds;
# `init="random"` only makes `lora_B` non-zero, since an untrained adapter is refused as a no-op,
# and the size does not depend on the values).

# %%
shipped = ml.load_model(ml.SHIPPED_BASE)
demo_config = ml.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init="random")
n_saved = 4
with tempfile.TemporaryDirectory() as directory:
    directories = [Path(directory) / f"task{task}" for task in range(n_saved)]
    for task, task_directory in enumerate(directories):
        ml.save_adapter(ml.add_lora(shipped, demo_config, seed=task), task_directory)
    tensor_files = [(task_directory / "adapter.safetensors").stat().st_size for task_directory in directories]
    adapter_dirs = [sum(f.stat().st_size for f in d.iterdir()) for d in directories]  # both files
trainable = lora_trainable_count(demo_config, shipped.config)
header = tensor_files[0] - 4 * trainable
base_file = Path(ml.SHIPPED_BASE).stat().st_size  # float16, as shipped
print(
    f"adapter: {trainable:,} parameters -> adapter.safetensors of {tensor_files[0]:,} bytes "
    f"({4 * trainable:,} of tensors, {header:,} of header); with its JSON: {adapter_dirs[0]:,} bytes"
)
print(
    f"base: {shipped.num_parameters():,} parameters -> {base_file:,} bytes as shipped (float16), "
    f"{4 * shipped.num_parameters():,} in float32"
)
assert 0 < header < 32_000  # the tensors are 4 bytes a parameter, the header a few kB
assert (
    max(adapter_dirs) - min(adapter_dirs) < 64
)  # four tasks, four files of the same size (a few bytes of JSON)

# %% [markdown]
# N fine-tuned tasks cost N full copies of the model, or one base and N adapters. With the sizes
# just measured (the float16 base file, the adapters' two files each), and for GPT-2 medium from
# the counts (float16 weights, float16 adapters at r = 8 on the two attention layers):


# %%
def storage(base_bytes, adapter_bytes, n_tasks):
    """(N full copies, one base + N adapters), in bytes."""
    return n_tasks * base_bytes, base_bytes + n_tasks * adapter_bytes


gpt2_medium = models["GPT-2 medium"]
attention_r8 = ml.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "attn.c_proj"])
cases = {
    "shipped base, r=8 all-linear (files)": (base_file, float(np.mean(adapter_dirs))),
    "GPT-2 medium, r=8 attention (fp16)": (
        2 * model_size(gpt2_medium),
        2 * lora_trainable_count(attention_r8, gpt2_medium),
    ),
}
tasks = np.array([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])
print(f"{'':<38}" + "".join(f"{f'N={n}':>10}" for n in (1, 10, 100, 1000)))
for label, (base_bytes, adapter_bytes) in cases.items():
    copies, adapters_only = storage(base_bytes, adapter_bytes, np.array([1, 10, 100, 1000]))
    print(f"{label:<38}" + "".join(f"{c / a:>9.1f}x" for c, a in zip(copies, adapters_only)))
    print(
        f"  {'(N copies / base + N adapters)':<36}  limit base/adapter = {base_bytes / adapter_bytes:,.0f}x"
    )

# %%
fig, ax = plt.subplots(figsize=(7.5, 3.6))
for i, (label, (base_bytes, adapter_bytes)) in enumerate(cases.items()):
    copies, adapters_only = storage(base_bytes, adapter_bytes, tasks)
    ax.loglog(tasks, copies / 1e6, "-", color=f"C{i}", label=f"{label}: N copies")
    ax.loglog(tasks, adapters_only / 1e6, "--", color=f"C{i}", label=f"{label}: base + N adapters")
ax.set(xlabel="tasks N", ylabel="MB on disk", title="N fine-tuned models on disk")
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=7)
fig.tight_layout()

# %%
base_bytes, adapter_bytes = cases["shipped base, r=8 all-linear (files)"]
ratio_100 = np.divide(*storage(base_bytes, adapter_bytes, 100))
assert 10 < ratio_100 < base_bytes / adapter_bytes  # base + 100 adapters: over 10x smaller than 100 copies
print(f"shipped base, 100 tasks: 100 copies are {ratio_100:.1f}x the base plus 100 adapters")

# %% [markdown]
# With one task the adapter saves nothing, since the base must be stored anyway (N = 1 gives
# 1 / (1 + adapter/base), just under 1x). The saving grows with N towards base / adapter: about
# 12x for the shipped base (its float16 file against float32 adapters on every linear layer, 4 %
# of its parameters) and about 300x for GPT-2 medium at r = 8 on the attention layers, both in
# 16-bit.
#
# ## Memory of a training step: the whole ledger
#
# A training step in float32 with AdamW holds, at its peak during the backward pass:
#
# - **weights**: 4 bytes per parameter, frozen or not (LoRA adds its adapter);
# - **gradients**: 4 bytes per *trainable* parameter;
# - **optimiser state**: AdamW's two moments, 8 bytes per trainable parameter;
# - **activations**: what the forward keeps for the backward (every layer's cache, the logits and
#   the batch), which grows with the batch B and the sequence length T;
# - **workspace**: the temporaries alive at the backward's peak.
#
# Counting only the first three, full fine-tuning costs 16 bytes per parameter and LoRA about 4
# (the frozen weights), which is where "LoRA cuts training memory by 4x" comes from. The
# activations barely shrink with LoRA: the gradient still flows back through every frozen layer,
# so most of what the layers cache is still needed (only what nothing but a frozen weight's
# gradient reads can go; see below). `minilora.lab.memory.memory_ledger` measures all
# five from the code: it builds the model, runs a real forward and backward at B = 1 and 2, counts
# the arrays the caches hold and traces the backward's temporaries with `tracemalloc`, and
# extends both lines to any B (exact: every cached array has B as its leading axis).
#
# minilora's presets at the batch sizes `minilora bench` uses (16 sequences of the preset's
# context), full fine-tuning against LoRA at r = 8 on `c_attn` and `attn.c_proj`:

# %%
KINDS = ("weights", "gradients", "optimizer_state", "activations", "workspace")
presets = {"tiny": 16, "small": 16, "medium": 16}  # preset -> B; T = its block size (64, 128, 256)
ledgers = {
    (preset, mode): memory_ledger(models[preset], B, lora_config=lora)
    for preset, B in presets.items()
    for mode, lora in (("full", None), ("LoRA", attention_r8))
}
print(f"{'':<13}" + "".join(f"{kind:>16}" for kind in (*KINDS, "total")))
for (preset, mode), ledger in ledgers.items():
    values = [getattr(ledger, kind) for kind in KINDS] + [ledger.total]
    print(f"{preset + ' ' + mode:<13}" + "".join(f"{format_bytes(v):>16}" for v in values))
for preset in presets:
    full, lora = ledgers[preset, "full"], ledgers[preset, "LoRA"]
    print(f"{preset}: LoRA's peak is {lora.total / full.total:.0%} of full fine-tuning's")

# %% [markdown]
# The parameter lines are exact formulas, and the ledger must agree with them to the byte:
# weights 4 P (+ 4 a for LoRA's adapter of a parameters), gradients 4 P or 4 a, state 8 P or 8 a.

# %%
for (preset, mode), ledger in ledgers.items():
    P = model_size(models[preset])
    a = 0 if mode == "full" else lora_trainable_count(attention_r8, models[preset])
    trained = P if mode == "full" else a
    assert (ledger.weights, ledger.gradients, ledger.optimizer_state) == (
        4 * (P + a),
        4 * trained,
        8 * trained,
    )
print("weights, gradients and AdamW state: exactly 4 (P + a), 4 x trainable and 8 x trainable bytes")

# %% [markdown]
# ### Measured: `tracemalloc` around a real training step
#
# The ledger is read off probe steps with all-zero weights. An independent check: trace a real
# model from scratch, GPT-2 initialisation, its AdamW state, and one `train_step` (forward,
# backward, clipping, the AdamW update) on a real batch, and read the traced peak. NumPy reports
# every array it allocates to `tracemalloc`, so the peak is everything the step holds at once. At
# B = 4 (the ledger's lines make that a fair test, and it is quick):


# %%
def traced_training_step(config, lora_config, batch_size):
    """Peak bytes traced from building the model to the end of one AdamW training step."""
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, config.vocab_size, (batch_size, config.block_size)) for _ in range(2))
    tracemalloc.start()
    try:
        model = ml.GPT(config, ml.init_params(config, seed=0))
        if lora_config is not None:
            model = ml.add_lora(model, lora_config)
        optimizer = AdamW(model.params, model.trainable_names, lr=1e-3)
        for kind in optimizer.state_names:  # the state exists during every step after the first
            for name in optimizer.names:
                optimizer.buffer(kind, name)
        tracemalloc.reset_peak()  # init_params' float64 draws are not part of a step
        train_step(model, optimizer, x, y, lr=None, grad_clip=1.0)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


B_measured = 4
print(f"{'':<13}{'ledger':>12}{'traced':>12}{'traced / ledger':>17}")
measured = {}
for preset in presets:
    for mode, lora in (("full", None), ("LoRA", attention_r8)):
        predicted = memory_ledger(models[preset], B_measured, lora_config=lora).total
        measured[preset, mode] = traced_training_step(models[preset], lora, B_measured)
        ratio = measured[preset, mode] / predicted
        print(
            f"{preset + ' ' + mode:<13}{format_bytes(predicted):>12}{format_bytes(measured[preset, mode]):>12}"
            f"{ratio:>17.3f}"
        )
        assert 0.94 < ratio < 1.01, (preset, mode, ratio)
        logits = 4 * B_measured * models[preset].block_size * models[preset].vocab_size  # float32 (B, T, V)
        assert abs((predicted - measured[preset, mode]) / logits - 1) < 0.25, (preset, mode)

# %% [markdown]
# The traced peaks agree with the ledger within 6 % (asserted: 0.94 to 1.01). The ledger is a
# little higher because it counts the logits, which `minilora bench` keeps until the backward is
# done, while `train_step` lets them go after the loss: the gap is the logits' bytes, 4 B T V,
# within 25 % (asserted), which at tiny is 3.5 % of the step.
#
# ### One bar per method and model
#
# The whole ledger at B = 16, stacked; each model on its own axis, since they differ 50-fold:

# %%
fig, axes = plt.subplots(1, len(presets), figsize=(11, 3.8))
colors = {"weights": "C7", "gradients": "C1", "optimizer_state": "C3", "activations": "C0", "workspace": "C9"}
for ax, preset in zip(axes, presets):
    bottom = np.zeros(2)
    for kind in KINDS:
        values = np.array([getattr(ledgers[preset, mode], kind) for mode in ("full", "LoRA")]) / 1e6
        ax.bar(["full", "LoRA r=8"], values, bottom=bottom, color=colors[kind], label=kind.replace("_", " "))
        bottom += values
    ax.set_title(f"{preset} ({model_size(models[preset]) / 1e6:.1f}M), 16 x {models[preset].block_size}")
    ax.set_ylabel("MB at the step's peak")
fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(KINDS), fontsize=8)
fig.suptitle("training memory by kind (float32, AdamW), from the ledger")
fig.tight_layout(rect=(0, 0.06, 1, 1))

# %% [markdown]
# ### The parameter side against the whole step
#
# Per parameter of the base model: the three parameter lines (weights, gradients, AdamW state)
# against the whole step, on the medium preset at B = 16.

# %%
full, lora = ledgers["medium", "full"], ledgers["medium", "LoRA"]
P = model_size(medium)


def parameter_side(ledger):
    return ledger.weights + ledger.gradients + ledger.optimizer_state


print(
    f"parameter side: {parameter_side(full) / P:.2f} -> {parameter_side(lora) / P:.2f} bytes per parameter "
    f"({parameter_side(lora) / parameter_side(full):.0%} of full)"
)
print(
    f"whole step:     {full.total / P:.1f} -> {lora.total / P:.1f} bytes per parameter "
    f"({lora.total / full.total:.0%} of full); activations {full.activations / full.total:.0%} of full's peak"
)
assert parameter_side(full) == 16 * P and parameter_side(lora) / P < 4.2
assert full.activations > 0.5 * full.total and lora.activations > 0.5 * lora.total  # activations dominate
assert 0.6 < lora.total / full.total < 0.9  # the whole step saves 10 to 40 %, not 75 %

# %% [markdown]
# On the parameter side LoRA goes from 16 bytes per parameter to 4.16, as advertised. The step as
# a whole does not: activations are 73 % of full fine-tuning's peak here, and LoRA's peak is
# about three quarters of full fine-tuning's (asserted between 60 % and 90 %).
#
# LoRA's activations are not quite the same as full fine-tuning's either. It adds one small cache
# per adapted layer (`h = x A^T`, (B, T, r)), and it *lets go* of the inputs of the frozen MLP
# layers, which only their weight gradients would read: `mlp.c_fc`'s input (B, T, C) and
# `mlp.c_proj`'s (B, T, 4C). The difference must be exactly 4 B T (2 r - 5 C) bytes per block:

# %%
for preset, B in presets.items():
    config = models[preset]
    T, C, L = config.block_size, config.n_embd, config.n_layer
    difference = ledgers[preset, "LoRA"].activations - ledgers[preset, "full"].activations
    assert difference == 4 * B * T * (2 * attention_r8.r - 5 * C) * L, (preset, difference)
    print(f"{preset}: LoRA's activations {difference / 1e6:+.1f} MB, = 4 B T (2 r - 5 C) per block")

# %% [markdown]
# ### Against the batch size
#
# The parameter lines are fixed; activations and workspace grow linearly in B. So LoRA's saving
# is large when the batch is small and shrinks as it grows:

# %%
batch_sizes = [1, 2, 4, 8, 16, 32, 64]
fig, ax = plt.subplots(figsize=(7, 3.5))
for i, preset in enumerate(presets):
    ratios = [
        memory_ledger(models[preset], B, lora_config=attention_r8).total
        / memory_ledger(models[preset], B).total
        for B in batch_sizes
    ]
    ax.semilogx(batch_sizes, ratios, "o-", color=f"C{i}", label=f"{preset}: whole step")
    side = parameter_side(ledgers[preset, "LoRA"]) / parameter_side(ledgers[preset, "full"])
    ax.axhline(side, color=f"C{i}", ls=":", lw=1)
    print(
        f"{preset:<7} LoRA / full at B = " + ", ".join(f"{B}: {r:.2f}" for B, r in zip(batch_sizes, ratios))
    )
    assert all(a <= b for a, b in zip(ratios, ratios[1:]))  # the saving shrinks as B grows
ax.set_xticks(batch_sizes, [str(B) for B in batch_sizes])
ax.set(xlabel="batch size B (sequences of the block size)", ylabel="LoRA peak / full peak", ylim=(0, 1))
ax.set_title("LoRA's memory saving (dotted: parameter lines only)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ### How much a token caches
#
# Activations are what the paper's figures (next section) leave out, so it pays to know their
# formula. Every cached array is (B, T, something) or (B, H, T, T), so per token the cache holds
# a fixed number of values per layer plus a fixed number outside the blocks. Fitting the ledger's
# activations of 32 small configurations (L, H, C, T and V varied) to
# `L (a C + b H T + c) + d C + e V + f` values per token gives whole numbers:

# %%
grid = [(L, H, C, T, V) for L in (1, 2) for H in (1, 2) for C in (16, 32) for T in (8, 16) for V in (64, 128)]
features, per_token = [], []
for L, H, C, T, V in grid:
    config = ml.GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=T, vocab_size=V)
    features.append([L * C, L * H * T, L, C, V, 1])
    per_token.append(memory_ledger(config, 1).activations / (4 * T))  # float32 values per token
coefficients = np.linalg.lstsq(np.array(features, dtype=np.float64), np.array(per_token), rcond=None)[0]
assert np.allclose(coefficients, np.round(coefficients), atol=1e-6), coefficients
a, b, c, d, e, f = (int(round(x)) for x in coefficients)
assert (a, b, c, d, e, f) == (21, 1, 2, 2, 2, 8)  # the breakdown read off the caches below
print(f"values cached per token: L ({a} C + {b} x H T + {c}) + {d} C + {e} V + {f}")


def activation_values(config, batch_size):
    """Values a full fine-tuning step caches, from the fitted formula."""
    L, H, C, T, V = config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size
    return batch_size * T * (L * (a * C + b * H * T + c) + d * C + e * V + f)


for preset, B in presets.items():  # held out: none of these was in the fit
    assert 4 * activation_values(models[preset], B) == ledgers[preset, "full"].activations, preset
print("the formula predicts the presets' ledgers to the byte")

# %% [markdown]
# Read off minilora's caches: per layer and token, the two LayerNorms' normalised inputs (2C), the
# inputs of the four linear layers (C + C + C + 4C), the fused q, k, v (3C) and q again in the
# heads' layout (C), GELU's input and its tanh (4C + 4C): 21 C; the attention probabilities, H T;
# the two LayerNorms' 1 / std, 2. Outside the blocks: the final LayerNorm's normalised input and the
# head's input (2C), the logits and their softmax (2V), the ids and targets (int64, 4 values' worth),
# the loss's copy of the targets with IGNORE replaced (int64, 2) and each target's weight in the
# mean (1), and the final LayerNorm's 1 / std: 8. The attention term H T is what makes long contexts
# expensive.
#
# ## GPT-3 175B: the LoRA paper's figures, from their formulas
#
# Hu et al. (2021, Section 4.2) report for GPT-3 175B that LoRA reduces training VRAM from 1.2 TB
# to 350 GB, and the checkpoint, with r = 4 on W_q and W_v only, from 350 GB to 35 MB ("roughly
# 10,000x"); the paper explains the memory saving as not storing optimiser states for frozen
# parameters ("up to 2/3" for Adam). Which assumptions reproduce these? GPT-3 175B has 96 layers,
# d_model = 12,288, 96 heads, a 2,048-token context and GPT-2's vocabulary (Brown et al., 2020);
# `parameter_shapes` gives its size (with GPT-2's biases, which GPT-3 may not have in exactly this
# form: within 0.5 % of 175B either way).

# %%
gpt3 = ml.GPTConfig(n_layer=96, n_head=96, n_embd=12288, block_size=2048, vocab_size=50257)
P3 = model_size(gpt3)
d_model, L3 = gpt3.n_embd, gpt3.n_layer
adapter_qv = L3 * 2 * 4 * (d_model + d_model)  # r = 4 on W_q and W_v, each (d, d): r (d + d) each
fp16 = 2  # bytes per value
print(f"GPT-3: {P3:,} parameters; r = 4 on q and v: {adapter_qv:,} adapter parameters")
paper = {"full VRAM": 1.2e12, "LoRA VRAM": 350e9, "checkpoint": 350e9, "adapter": 35e6}
recipes = {
    "checkpoint: fp16 weights": (fp16 * P3, paper["checkpoint"]),
    "adapter: fp16 r=4 q, v": (fp16 * adapter_qv, paper["adapter"]),
    "LoRA VRAM: fp16 weights + adapter's 3 fp16 lines": (
        fp16 * P3 + 3 * fp16 * adapter_qv,
        paper["LoRA VRAM"],
    ),
    "full VRAM: fp16 weights + 2 Adam moments (3 x)": (3 * fp16 * P3, paper["full VRAM"]),
    "full VRAM: ... + an fp16 gradient (4 x)": (4 * fp16 * P3, paper["full VRAM"]),
    "full VRAM: mixed precision, 16 bytes/param": (16 * P3, paper["full VRAM"]),
}
print(f"{'recipe':<52}{'computed':>13}{'paper':>11}{'off by':>9}")
for label, (computed, reported) in recipes.items():
    print(f"{label:<52}{computed / 1e9:>10.4g} GB{reported / 1e9:>8.4g} GB{computed / reported - 1:>+9.1%}")
print(f"checkpoint / adapter: {P3 / adapter_qv:,.0f}x (the paper: roughly 10,000x)")

# %%
off = {label: computed / reported - 1 for label, (computed, reported) in recipes.items()}
assert abs(P3 / 175e9 - 1) < 0.005
assert (
    abs(off["checkpoint: fp16 weights"]) < 0.01
    and abs(off["LoRA VRAM: fp16 weights + adapter's 3 fp16 lines"]) < 0.01
)
assert abs(off["adapter: fp16 r=4 q, v"]) < 0.1  # 37.7 MB against "35 MB"
assert (
    0.85
    < 1 + off["full VRAM: fp16 weights + 2 Adam moments (3 x)"]
    < 1
    < 1 + off["full VRAM: ... + an fp16 gradient (4 x)"]
    < 1.2
)
assert off["full VRAM: mixed precision, 16 bytes/param"] > 1  # more than twice the paper's figure
assert 5_000 < P3 / adapter_qv < 15_000

# %% [markdown]
# What reproduces the paper, and on which assumptions:
#
# - **350 GB checkpoint** = the weights in 16-bit, 2 bytes x 174.6B (within 1 %). **35 MB
#   adapter** = 18.9M adapter parameters in 16-bit, 37.7 MB (7.9 % above "35 MB"; 36.0 MiB).
#   Their ratio is about 9,250x: "roughly 10,000x".
# - **350 GB LoRA training** = the frozen 16-bit weights and nothing else of note: the adapter's
#   weights, gradients and two Adam moments add 0.1 GB. Within 1 %, *with no activations counted*.
# - **1.2 TB full fine-tuning** is bracketed by, but not equal to, the simple recipes: 16-bit
#   weights plus Adam's two moments in 16-bit (the paper's "2/3" rule) give 1.05 TB (13 % low);
#   adding a 16-bit gradient gives 1.40 TB (16 % high). The standard mixed-precision recipe (fp32
#   master weights and moments, 16 bytes per parameter) gives 2.8 TB, more than twice the figure.
#   The paper does not give its accounting, so "weights and optimiser state in 16-bit, ~3 copies
#   of the model" is as close as the formulas get.
#
# None of these figures contains activations. With the per-token formula just measured, one
# 2,048-token sequence of GPT-3 cached the way minilora caches it (no recomputation), in 16-bit:

# %%
gpt3_activations = fp16 * activation_values(gpt3, 1)
r_paper = 4  # with LoRA on c_attn and attn.c_proj: 2r added and 5C let go per layer and token (above)
lora_gpt3_activations = gpt3_activations - fp16 * gpt3.block_size * L3 * (5 * d_model - 2 * r_paper)
print(
    f"GPT-3, one sequence of 2,048 tokens: {format_bytes(gpt3_activations)} of activations in 16-bit "
    f"({gpt3_activations / (fp16 * P3):.0%} of the weights); with LoRA (r = 4, c_attn and attn.c_proj) "
    f"{format_bytes(lora_gpt3_activations)}"
)
assert 0.3 < gpt3_activations / (fp16 * P3) < 0.7

# %% [markdown]
# About half the weights again, per sequence, and LoRA keeps most of it. So the paper's 350 GB
# describes the parameter side of training; a real run adds its activations on top, which is why
# large-model training recomputes them (activation checkpointing) or keeps micro-batches small.
#
# ## Compute per step: the products, counted
#
# `count_matmuls` records every matrix product a block of code makes. A full step computes, for
# every weight, the forward product, the input gradient and the weight gradient: three products of
# the same size. LoRA skips the weight gradients of frozen weights, but still needs their input
# gradients (the gradient must reach the adapters in earlier layers), and attention's two
# products (q k^T and att v) have no weights and are differentiated in full either way. So the
# saving is at most a third.
#
# The README's figures, 207 GFLOP for LoRA against 292 for a full step, are for minilora's *medium
# preset* (6 layers, C = 384) at 16 x 256 tokens with r = 8 on `c_attn` and `attn.c_proj`. We count
# them: every product's operands carry the batch as their leading axis, so a step's FLOPs are
# exactly linear in B; we count real steps at B = 1 and B = 2 and check that.

# %%
medium_base = ml.GPT(medium, ml.init_params(medium, seed=0))
medium_lora = ml.add_lora(medium_base, attention_r8)
rng = np.random.default_rng(0)
counted = {}
for mode, model in (("full", medium_base), ("LoRA", medium_lora)):
    for B in (1, 2):
        x, y = (rng.integers(0, 256, (B, medium.block_size)) for _ in range(2))
        with count_matmuls() as log:
            _, _, cache = model.forward(x, y)
            model.backward(cache)
        counted[mode, B] = log.flops
    assert counted[mode, 2] == 2 * counted[mode, 1]  # exactly linear in the batch
B_readme = 16
for mode, lora in (("full", None), ("LoRA", attention_r8)):
    at_16 = B_readme * counted[mode, 1]
    assert at_16 == step_flops(medium, B_readme, lora_config=lora)["total"]  # the bench's formula
    print(f"medium, 16 x 256, {mode:<4}: {at_16 / 1e9:7.2f} GFLOP counted (16 x the B = 1 count)")
ratio_medium = counted["LoRA", 1] / counted["full", 1]
print(f"LoRA / full: {ratio_medium:.3f}")
assert round(B_readme * counted["full", 1] / 1e9) == 292 and round(B_readme * counted["LoRA", 1] / 1e9) == 207
assert 2 / 3 < ratio_medium < 0.75

# %% [markdown]
# Counted: 292.33 GFLOP against 207.27, LoRA at 0.709 of a full step, just above the 2/3 limit
# (attention's backward and the adapter's own products are the rest). The counts equal
# `minilora.lab.bench.step_flops`, the formula the benchmarks use, so the same formula gives GPT-2
# medium itself (not built here; 16 sequences of 1,024 tokens) and GPT-3:

# %%
for label, config, lora, B in (
    ("GPT-2 medium, r=8 attention, 16 x 1024", gpt2_medium, attention_r8, 16),
    ("GPT-3 175B, r=4 c_attn, 1 x 2048", gpt3, ml.LoraConfig(r=4, target_modules=["c_attn"]), 1),
):
    full_flops, lora_flops = step_flops(config, B)["total"], step_flops(config, B, lora_config=lora)["total"]
    print(
        f"{label:<40} full {full_flops / 1e12:8.1f} TFLOP, LoRA {lora_flops / 1e12:8.1f} TFLOP "
        f"({lora_flops / full_flops:.3f})"
    )
    assert 2 / 3 < lora_flops / full_flops < 0.75

# %% [markdown]
# At most a third fewer FLOPs, 1.5x at the very best; the paper measured a 25 % training
# throughput gain on GPT-3 175B (Section 4.2), within that bound.
#
# ## One fused `c_attn` is not separate q and v adapters
#
# GPT-2 computes q, k and v with one fused (C, 3C) weight, `c_attn`, and minilora (like PEFT on
# GPT-2) adapts it as one matrix: one `lora_A` (r, C) and one `lora_B` (3C, r). The paper adapts
# W_q and W_v, each (d, d), with their own factors. Per block:
#
# - parameters: fused r (C + 3C) = 4 r C; separate q and v: 2 r (C + C) = 4 r C. **The same**;
#   for GPT-3 at r = 4 both are the 18.9M above.
# - rank: the fused update `ΔW = s A^T B^T` has rank at most r in total, and its q, k and v parts
#   share one input subspace (A's rows). Separate adapters give q and v rank r each, from input
#   subspaces of their own: their stacked update can have rank 2r.
# - k: the fused adapter adapts k as well; the paper leaves it frozen.
# - to match the paper's rank per projection with one fused adapter takes rank 2r, 8 r C per
#   block, twice the parameters, and it would still adapt k.
#
# Checked on a built fused adapter (the shipped base, r = 4, random non-zero `lora_B`):

# %%
r_fused = 4
C = shipped.config.n_embd
fused = ml.add_lora(shipped, ml.LoraConfig(r=r_fused, lora_alpha=8, target_modules=["c_attn"], init="random"))
module = "transformer.h.0.attn.c_attn"
delta = lora_delta_weight(
    fused.params[f"{module}.lora_A"].astype(np.float64),
    fused.params[f"{module}.lora_B"].astype(np.float64),
    fused.lora_config.scaling,
)  # (C, 3C), in float64 so that rank() sees no float32 rounding
q_part, k_part, v_part = delta[:, :C], delta[:, C : 2 * C], delta[:, 2 * C :]
rank = np.linalg.matrix_rank
print(
    f"ΔW {delta.shape}: rank {rank(delta)}; q, k, v parts: rank {rank(q_part)}, {rank(k_part)}, {rank(v_part)}; "
    f"q and v side by side: rank {rank(np.hstack([q_part, v_part]))} (separate adapters: up to {2 * r_fused})"
)
assert rank(delta) == rank(np.hstack([q_part, v_part])) == r_fused  # one shared r-dimensional input subspace
assert np.linalg.norm(k_part) > 0.1 * np.linalg.norm(delta)  # k is adapted too
per_block = lora_trainable_count(fused.lora_config, shipped.config) // shipped.config.n_layer
assert (
    per_block == 4 * r_fused * C == 2 * r_fused * (C + C)
)  # the paper's q and v at the same r: the same count
assert lora_trainable_count(ml.LoraConfig(r=4, target_modules=["c_attn"]), gpt3) == adapter_qv
print(f"per block: fused {per_block:,} = separate q and v {2 * r_fused * (C + C):,} parameters")

# %% [markdown]
# ## Data parallel: what crosses the network
#
# Data parallelism gives each of N workers a shard of the batch, and after the backward the workers
# add their gradients together so that every one takes the same optimiser step
# (`mpirun -n N minilora finetune ...`, docs/distributed.md). Only *trainable* gradients are added:
# the frozen base is the same on every worker and never changes, so it is never sent. A step's
# message is therefore the trainable count times 4 bytes (float32), plus the loss, whatever the
# algorithm (an all-gather sends it to each of the N - 1 others, a ring all-reduce about twice it):
# LoRA's traffic shrinks exactly as its trainable count does.

# %%
traffic = {
    "medium, r=8 on c_attn": traffic_table(ml.get_preset("medium"), ml.LoraConfig(r=8)),
    "SmolLM2-135M, r=8 on q, v": traffic_table(
        SMOLLM2_SHAPE, ml.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    ),
    "GPT-3 175B, r=4 on c_attn": traffic_table(gpt3, ml.LoraConfig(r=4)),
}
link_bytes_per_second = 10e9 / 8  # an assumed 10 Gb/s link between two machines
for name, row in traffic.items():
    print(
        f"{name:28s} LoRA {row['lora_bytes'] / 2**20:9.2f} MiB  full {row['full_bytes'] / 2**20:11.1f} MiB"
        f"  share {100 * row['lora_share']:.3f} %"
        f"  at 10 Gb/s: {1e3 * row['lora_bytes'] / link_bytes_per_second:8.2f} ms"
        f" vs {1e3 * row['full_bytes'] / link_bytes_per_second:10.1f} ms"
    )
    assert row["lora_share"] < 0.01  # under 1 % of a full fine-tune's traffic, on every model here
assert traffic["medium, r=8 on c_attn"]["lora_trainable"] == 6 * 8 * (
    384 + 3 * 384
)  # r (C_in + C_out) per block

# %% [markdown]
# The share is the trainable share: about r / C per adapted matrix, so it falls as models grow. At
# GPT-3's size a full fine-tune would send 650 GiB per step, minutes on a 10 Gb/s link, where the
# adapter sends 18 MiB. The message the step really builds is checked below: one flat buffer of
# every trainable gradient and the loss, on the shipped base with a rank-8 adapter.

# %%
lora_model = ml.add_lora(shipped, ml.LoraConfig(r=8))
lora_optimizer = AdamW(lora_model.params, lora_model.trainable_names, lr=1e-3)
one_rank = MpiStep(World(0, 1), lora_optimizer.names)
tokens = np.random.default_rng(0).integers(0, shipped.config.vocab_size, (2, 2, 32))  # (x or y, B, T)
one_rank(lora_model, lora_optimizer, tokens[0], tokens[1], 1e-3, 1.0)
sent = one_rank.buffers[0].nbytes  # what each rank would send each other rank per step
trainable_count = lora_model.num_parameters(trainable_only=True)
print(f"the step's buffer: {sent:,} bytes for {trainable_count:,} trainable numbers and the loss")
assert sent == step_bytes(trainable_count, 4)

# %% [markdown]
# ## Summary
#
# - Every adapted matrix costs r (C_in + C_out) trainable parameters (checked for every preset,
#   GPT-2 size, rank and target set, and against built models); at a fixed rank the share of the
#   model shrinks as models grow, about r / C per matrix.
# - **Storage** is where LoRA saves the most: an adapter is 4 bytes per trainable parameter plus a
#   few kB; N tasks cost one base and N adapters, over 10x less than N copies at N = 100 for the
#   shipped base and approaching base / adapter as N grows.
# - **Memory**: the parameter side falls from 16 bytes per parameter to about 4 (exact, to the
#   byte), but activations do not shrink with LoRA and are most of a step. On the medium preset at
#   16 x 256, LoRA's peak is about 76 % of full fine-tuning's (asserted 60-90 %); the ledger agrees
#   with `tracemalloc` around real steps within 6 %. The smaller the batch, the closer the saving
#   gets to the parameter side's.
# - **GPT-3 175B**: the paper's 350 GB and 35 MB are the 16-bit weights and the 16-bit adapter
#   (within 1 % and 8 %); its 1.2 TB lies between 3 and 4 16-bit copies of the weights (the
#   paper's "2/3": weights and Adam's moments, -13 %; with a gradient, +16 %). No activations are
#   in these figures; one 2,048-token sequence would add roughly half the weights again.
# - **Compute**: a LoRA step skips only the frozen weights' gradients: 207.27 against 292.33 GFLOP
#   counted on the medium preset (0.709), never below 2/3 of a full step.
# - minilora's fused `c_attn` adapter has the paper's q-and-v parameter count but a shared rank-r
#   input subspace for q, k and v, and it adapts k.
# - **Data parallel**: only trainable gradients cross the network, so LoRA's traffic per step is its
#   trainable share of a full fine-tune's: 0.68 % on the medium preset at r = 8, 0.34 % on
#   SmolLM2-135M with q and v at r = 8.
