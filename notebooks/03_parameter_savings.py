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
# # 3. Parameter savings
#
# LoRA trains `lora_A` (r, C_in) and `lora_B` (C_out, r) instead of a (C_in, C_out) weight:
# **r (C_in + C_out)** numbers per adapted matrix instead of C_in C_out. This notebook counts what
# that means for whole models, minilora's presets and the shapes of GPT-2 small, medium and
# large: trainable parameters and their share of the model, the size of the adapter file, and the
# memory that training needs for gradients and optimiser state. Counting needs only shapes, so the
# large models are never built.

# %%
# %matplotlib inline

# %%
import math
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minilora as ml
from minilora.lora.accounting import format_table, lora_parameter_table, lora_trainable_count
from minilora.model import parameter_shapes
from minilora.optim import AdamW

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
    return sum(math.prod(shape) for shape in parameter_shapes(config).values())


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
# the model's trainable parameters are exactly the count. (The README's table for the medium
# preset, e.g. 110,592 at r = 8 on the two attention layers, follows from the same formula.)

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
assert lora_trainable_count(ml.LoraConfig(r=8, target_modules=["c_attn"]), medium) == 73_728
assert lora_trainable_count(ml.LoraConfig(r=8, target_modules=["c_attn", "attn.c_proj"]), medium) == 110_592

# %% [markdown]
# ## Against model size and rank
#
# Per matrix the share is r (C_in + C_out) / (C_in C_out), about r / C for square-ish matrices: it
# grows linearly with the rank and *shrinks* as models get wider. Embeddings, which LoRA leaves
# alone here, lower it further for models with a large vocabulary.

# %%
table_models = ["small", "shipped base", "medium", "GPT-2 small", "GPT-2 medium", "GPT-2 large"]
print(f"{'trainable % at rank r':<32}" + "".join(f"{r:>8}" for r in ranks))
for target_name, target in targets.items():
    print(target_name)
    for name in table_models:
        config = models[name]
        shares = [
            100 * lora_trainable_count(ml.LoraConfig(r=r, target_modules=target), config) / model_size(config)
            for r in ranks
        ]
        print(f"  {name:<30}" + "".join(f"{share:>8.3f}" for share in shares))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for ax, (target_name, target) in zip(axes, targets.items()):
    for name in table_models:
        config = models[name]
        shares = [
            100 * lora_trainable_count(ml.LoraConfig(r=r, target_modules=target), config) / model_size(config)
            for r in ranks
        ]
        ax.loglog(ranks, shares, "o-", label=f"{name} ({model_size(config) / 1e6:.1f}M)")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="rank r", title=target_name)
    ax.grid(alpha=0.3, which="both")
axes[0].set_ylabel("trainable parameters, % of the model")
axes[1].legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## The adapter on disk
#
# An adapter file holds only `lora_A` and `lora_B` (and a small JSON header: the config and the
# fingerprint of the base it belongs to), so its size is 4 bytes per trainable parameter in
# float32. Here is the real file for the shipped base at r = 8 on every linear layer, as the demo
# trains it. (`init="random"` only makes `lora_B` non-zero, since an untrained adapter is refused
# as a no-op; the size does not depend on the values.)

# %%
shipped = ml.load_model(ml.SHIPPED_BASE)
demo_adapter = ml.add_lora(
    shipped, ml.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init="random")
)
trainable = demo_adapter.num_parameters(trainable_only=True)
with tempfile.TemporaryDirectory() as directory:
    file_bytes = ml.save_adapter(demo_adapter, directory).stat().st_size
header = file_bytes - 4 * trainable
print(
    f"adapter: {trainable:,} parameters -> {file_bytes:,} bytes on disk ({4 * trainable:,} of tensors, "
    f"{header:,} of header)"
)
print(
    f"base: {shipped.num_parameters():,} parameters -> {Path(ml.SHIPPED_BASE).stat().st_size:,} bytes as shipped "
    f"(float16), {4 * shipped.num_parameters():,} in float32"
)
assert 0 < header < 32_000

# %% [markdown]
# For GPT-2, at r = 8 on the two attention layers of every block:

# %%
print(f"{'':<14} {'model (float32)':>16} {'adapter (float32)':>18} {'ratio':>7}")
for name in ("GPT-2 small", "GPT-2 medium", "GPT-2 large"):
    config = models[name]
    adapter = lora_trainable_count(ml.LoraConfig(r=8, target_modules=["c_attn", "attn.c_proj"]), config)
    print(
        f"{name:<14} {4 * model_size(config) / 1e6:>13.1f} MB {4 * adapter / 1e6:>15.2f} MB "
        f"{model_size(config) / adapter:>6.0f}x"
    )

# %% [markdown]
# ## Memory for training: gradients and optimiser state
#
# Training in float32 with AdamW keeps, for every *trainable* parameter, its gradient (4 bytes)
# and Adam's two moment estimates (8 bytes), on top of the weight itself (4 bytes). A frozen
# parameter costs only its 4 bytes. So full fine-tuning needs 16 bytes per parameter, and LoRA
# needs 4 per base parameter plus 16 per adapter parameter. (Activations, which depend on batch and
# sequence length, come on top in both cases; LoRA still stores most of them, since the gradient
# must flow back through the frozen layers.)
#
# minilora's optimiser keeps state only for the names it is given, so this can be checked: one
# training step of the `small` preset, in full and with LoRA, and the sizes of the gradient dict
# and of AdamW's state.

# %%
small = models["small"]
batch = np.random.default_rng(0).integers(0, 256, (2, 33))
idx, targets_batch = batch[:, :-1], batch[:, 1:]


def one_step(model):
    """Gradient and AdamW-state sizes (numbers) after one step of ``model``."""
    optimizer = AdamW(model.params, model.trainable_names, lr=1e-3)
    _, _, cache = model.forward(idx, targets_batch)
    grads = model.backward(cache)
    optimizer.step(grads)
    state = sum(int(buffer.size) for buffer in optimizer.state_dict()["buffers"].values())
    return sum(int(g.size) for g in grads.values()), state


full_model = ml.GPT(small, ml.init_params(small, seed=0))
lora_model = ml.add_lora(
    ml.GPT(small, ml.init_params(small, seed=0)), ml.LoraConfig(r=8, target_modules="all-linear")
)
for label, model in (("full", full_model), ("LoRA r=8", lora_model)):
    n_trainable = model.num_parameters(trainable_only=True)
    n_grad, n_state = one_step(model)
    print(
        f"{label:<9} trainable {n_trainable:>9,}  gradients {n_grad:>9,}  AdamW state {n_state:>9,} "
        "(= 2 x trainable)"
    )
    assert n_grad == n_trainable and n_state == 2 * n_trainable

# %% [markdown]
# The same bookkeeping for GPT-2's sizes, LoRA at r = 8 on the two attention layers:


# %%
def training_memory(n_frozen, n_trainable):
    """Bytes by kind for float32 AdamW training: weights, gradients, Adam's two moments."""
    return {
        "weights": 4 * (n_frozen + n_trainable),
        "gradients": 4 * n_trainable,
        "AdamW state": 8 * n_trainable,
    }


bars = {}
for name in ("GPT-2 small", "GPT-2 medium", "GPT-2 large"):
    config = models[name]
    total = model_size(config)
    adapter = lora_trainable_count(ml.LoraConfig(r=8, target_modules=["c_attn", "attn.c_proj"]), config)
    bars[f"{name}\nfull"] = training_memory(0, total)
    bars[f"{name}\nLoRA"] = training_memory(total, adapter)
    full_gb = sum(bars[f"{name}\nfull"].values()) / 1e9
    lora_gb = sum(bars[f"{name}\nLoRA"].values()) / 1e9
    print(
        f"{name:<13} full fine-tuning {full_gb:5.2f} GB, LoRA {lora_gb:5.2f} GB ({full_gb / lora_gb:.1f}x less)"
    )
    assert bars[f"{name}\nLoRA"]["AdamW state"] == 8 * adapter

fig, ax = plt.subplots(figsize=(9, 3.8))
bottom = np.zeros(len(bars))
for kind in ("weights", "gradients", "AdamW state"):
    values = np.array([memory[kind] for memory in bars.values()]) / 1e9
    ax.bar(list(bars), values, bottom=bottom, label=kind)
    bottom += values
ax.set_ylabel("GB (float32, activations not counted)")
ax.set_title("training memory: full fine-tuning vs LoRA r = 8 on c_attn and attn.c_proj")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Summary
#
# - Every adapted matrix costs r (C_in + C_out) trainable parameters; checked for every preset,
#   GPT-2 size, rank and target set, and against the tensors of built models.
# - At a fixed rank the share of the model shrinks as models grow (about r / C per matrix):
#   r = 8 on the attention layers is 0.36 % of GPT-2 small and 0.29 % of GPT-2 large.
# - The adapter file is 4 bytes per trainable parameter plus a few kilobytes of header, a few
#   hundred times smaller than the model.
# - Training memory falls from 16 bytes per parameter to about 4: the frozen weights dominate, and
#   gradients and AdamW state exist only for the adapter (checked on a real step: 2 state numbers
#   per trainable parameter).
