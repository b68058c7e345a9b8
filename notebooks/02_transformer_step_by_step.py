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
# # 2. The transformer, step by step
#
# minilora's GPT-2 is built from seven layers, each a pair of plain functions in
# `minilora/layers/`: `name_forward(...) -> (out, cache)` and `name_backward(dout, cache) -> gradients`.
# In this notebook we chain them by hand into a one-block model, forward and backward, printing
# every shape, and check that we get exactly what `minilora.model.GPT` computes. Then we check a
# whole tiny model's gradients against finite differences, watch the check catch a planted bug,
# and see where LoRA plugs in.
#
# Shape letters: B batch, T positions, C channels, H heads, hs = C / H head size, V vocabulary,
# r LoRA rank.

# %%
# %matplotlib inline

# %%
import inspect

import matplotlib.pyplot as plt
import numpy as np

from minilora import GPT, GPTConfig, LoraConfig, add_lora, get_preset, init_params
from minilora.backend import count_matmuls
from minilora.fast.cpu.inference import use_one_blas_thread
from minilora.gradcheck import GradCheckError, check_layer, check_model
from minilora.layers import (
    attention_backward,
    attention_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from minilora.lora.accounting import format_table, lora_parameter_table

blas_threads = use_one_blas_thread()  # as a training step: a Jupyter kernel starts with one per core

# %% [markdown]
# ## A one-block model
#
# A GPT-2 with one block, two heads and 8 channels, in float64. GPT-2's initialisation sets every
# bias to 0 and every LayerNorm gain to 1, and its weights are small; we add noise to every
# parameter, as a model looks after some training, so that no gradient path is accidentally zero
# or tiny (a check on degenerate values can pass while the code is wrong).

# %%
config = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=16)
rng = np.random.default_rng(0)
params = init_params(config, seed=0, dtype=np.float64)
for value in params.values():
    value += 0.1 * rng.standard_normal(value.shape)  # moved away from the initialisation
model = GPT(config, params)

B, T = 2, 5
idx = rng.integers(0, config.vocab_size, (B, T))  # input token ids
targets = rng.integers(0, config.vocab_size, (B, T))  # the next token at each position
p = {
    name.removeprefix("transformer.").removeprefix("h.0."): value for name, value in params.items()
}  # short names
for name, value in p.items():
    print(f"{name:<20} {str(value.shape):>10}")


# %%
def show(**arrays):
    for name, value in arrays.items():
        print(f"  {name:<8} {str(value.shape):<14}")


# %% [markdown]
# ## Forward, layer by layer
#
# GPT-2 is pre-LayerNorm: each block normalises, transforms, and *adds* the result back into the
# residual stream `x`.
#
#     x = wte[idx] + wpe[:T]
#     x = x + attn.c_proj(attention(attn.c_attn(ln_1(x))))
#     x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))
#     logits = ln_f(x) @ wte^T          (the output head shares the token embedding)

# %%
print("embeddings")
tok, emb_cache = embedding_forward(idx, p["wte.weight"])  # rows of the (V, C) table
x0 = tok + p["wpe.weight"][:T]  # learned positions, broadcast over the batch
show(idx=idx, tok=tok, x0=x0)

print("attention sub-block")
h1, ln_1 = layernorm_forward(x0, p["ln_1.weight"], p["ln_1.bias"])
qkv, c_attn = linear_forward(h1, p["attn.c_attn.weight"], p["attn.c_attn.bias"])  # q, k, v side by side
a, attn = attention_forward(qkv, config.n_head)  # heads (B, H, T, hs) inside, concatenated back
a_out, attn_proj = linear_forward(a, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
x1 = x0 + a_out  # residual
show(h1=h1, qkv=qkv, q_head=attn.q, att=attn.att, a=a, x1=x1)

print("MLP sub-block")
h2, ln_2 = layernorm_forward(x1, p["ln_2.weight"], p["ln_2.bias"])
f, c_fc = linear_forward(h2, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])  # 4C wide
g, gelu = gelu_forward(f)
m, mlp_proj = linear_forward(g, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
x2 = x1 + m  # residual
show(h2=h2, f=f, g=g, m=m, x2=x2)

print("head and loss")
xf, ln_f = layernorm_forward(x2, p["ln_f.weight"], p["ln_f.bias"])
logits, head = linear_forward(xf, p["wte.weight"].T)  # tied: W = wte^T, (C, V), no bias
loss, ce = cross_entropy_forward(logits, targets)
show(xf=xf, logits=logits)
print(f"  loss     {float(loss):.6f} nats (uniform guessing: ln V = {np.log(config.vocab_size):.6f})")

# %% [markdown]
# The attention probabilities `att` are (B, H, T, T): for every head, how much each position looks at
# each earlier one. The causal mask makes them lower-triangular:

# %%
print(np.round(attn.att[0, 0], 3))
assert np.allclose(np.triu(attn.att[0, 0], k=1), 0) and np.allclose(attn.att.sum(axis=-1), 1)

# %% [markdown]
# The library's `GPT.forward` must give the same logits and loss.

# %%
logits_lib, loss_lib, cache = model.forward(idx, targets)
assert np.allclose(logits, logits_lib, rtol=1e-12, atol=1e-12) and np.isclose(loss, loss_lib, rtol=1e-12)
print(
    f"same logits (max difference {np.max(np.abs(logits - logits_lib)):.1e}) and loss as minilora.GPT.forward"
)

# %% [markdown]
# ## Backward, layer by layer
#
# Now in reverse. Each `*_backward` returns fresh gradients for its forward's inputs. Two places
# need care, and both are sums:
#
# - **the residual stream**: `x1 = x0 + a_out` sends x0 to two places (the next layer and the
#   attention branch), so dx0 is the gradient coming straight down *plus* the one coming back
#   through the branch;
# - **the tied embedding**: `wte` is used by the lookup and by the output head, so its gradient is
#   the scatter-add of the lookup *plus* the head's weight gradient (transposed).

# %%
grads = {}
print("loss and head")
dlogits = cross_entropy_backward(1.0, ce)  # (softmax - onehot) / (B T)
dxf, dW_head, _ = linear_backward(dlogits, head)  # logits = xf wte^T: dW_head = d(wte^T), (C, V)
dx2, grads["ln_f.weight"], grads["ln_f.bias"] = layernorm_backward(dxf, ln_f)
show(dlogits=dlogits, dW_head=dW_head, dx2=dx2)

print("MLP sub-block: x2 = x1 + m")
dm = dx2  # the residual hands dx2 to the branch unchanged ...
dg, grads["mlp.c_proj.weight"], grads["mlp.c_proj.bias"] = linear_backward(dm, mlp_proj)
df = gelu_backward(dg, gelu)
dh2, grads["mlp.c_fc.weight"], grads["mlp.c_fc.bias"] = linear_backward(df, c_fc)
dx1_branch, grads["ln_2.weight"], grads["ln_2.bias"] = layernorm_backward(dh2, ln_2)
dx1 = dx2 + dx1_branch  # ... and to x1; the two paths add
show(dg=dg, df=df, dh2=dh2, dx1=dx1)

print("attention sub-block: x1 = x0 + a_out")
da, grads["attn.c_proj.weight"], grads["attn.c_proj.bias"] = linear_backward(dx1, attn_proj)
dqkv = attention_backward(da, attn)
dh1, grads["attn.c_attn.weight"], grads["attn.c_attn.bias"] = linear_backward(dqkv, c_attn)
dx0_branch, grads["ln_1.weight"], grads["ln_1.bias"] = layernorm_backward(dh1, ln_1)
dx0 = dx1 + dx0_branch
show(da=da, dqkv=dqkv, dh1=dh1, dx0=dx0)

print("embeddings: x0 = wte[idx] + wpe[:T]")
grads["wpe.weight"] = np.zeros_like(p["wpe.weight"])  # rows >= T were not used: zero gradient
grads["wpe.weight"][:T] = dx0.sum(axis=0)  # broadcast over the batch in the forward: summed here
grads["wte.weight"] = embedding_backward(dx0, emb_cache) + dW_head.T  # lookup + tied head
show(dwpe=grads["wpe.weight"], dwte=grads["wte.weight"])

# %% [markdown]
# Every gradient must equal what `GPT.backward` returns under its full Hugging Face name.

# %%
grads_lib = model.backward(cache)
assert len(grads_lib) == len(grads) == len(params)
for name, grad in grads_lib.items():
    mine = grads[name.removeprefix("transformer.").removeprefix("h.0.")]
    assert mine.shape == grad.shape and np.allclose(mine, grad, rtol=1e-10, atol=1e-12), name
print(f"all {len(grads)} gradients equal minilora.GPT.backward's")

# %% [markdown]
# ## The gradient check of a whole tiny model
#
# Matching the library proves the walk-through, not the library. For that, finite differences:
# `check_model` nudges the parameters and compares the change of the loss with the gradients.
# On the `tiny` preset (2 blocks, 64 channels, 120,576 parameters) every tensor is checked in 4
# random directions, and at 4 random coordinates each, in float64. minilora's tests require a
# relative error below 1e-5 for a whole model.

# %%
tiny = get_preset("tiny")
tiny_params = init_params(tiny, seed=1, dtype=np.float64)
for value in tiny_params.values():
    value += 0.1 * rng.standard_normal(value.shape)
tiny_model = GPT(tiny, tiny_params)
idx_tiny = rng.integers(0, tiny.vocab_size, (2, 16))
targets_tiny = rng.integers(0, tiny.vocab_size, (2, 16))

directions = check_model(tiny_model, idx_tiny, targets_tiny, mode="direction", n_samples=4)
coordinates = check_model(tiny_model, idx_tiny, targets_tiny, mode="coordinates", n_samples=4)
print(f"{tiny_model.num_parameters():,} parameters in {len(directions.checks)} tensors")
print(
    f"worst relative error: {directions.max_error:.1e} in random directions ({directions.worst().name}), "
    f"{coordinates.max_error:.1e} at random coordinates ({coordinates.worst().name})"
)
directions.assert_ok(1e-5)
coordinates.assert_ok(1e-5)

# %%
errors = directions.errors()
fig, ax = plt.subplots(figsize=(9, 3.2))
ax.bar(range(len(errors)), list(errors.values()))
ax.axhline(1e-5, color="red", ls="--", label="tolerance 1e-5")
ax.set_yscale("log")
ax.set_xticks(
    range(len(errors)), [name.removeprefix("transformer.") for name in errors], rotation=90, fontsize=7
)
ax.set_ylabel("relative error")
ax.set_title("tiny preset: every parameter tensor against finite differences (float64)")
ax.legend()
fig.tight_layout()

# %% [markdown]
# A check that cannot fail checks nothing. Plant a bug: a GELU backward that forgets the derivative
# of its tanh, `0.5 x (1 - t²) du/dx`, and keeps only `0.5 (1 + t)`. The check must fail, loudly,
# naming the tensor, the index and both values.


# %%
def gelu_backward_forgetting_tanh(dout, cache):
    return dout * 0.5 * (1.0 + cache.t)  # planted bug: the second term of the derivative is gone


x_gelu = {"x": rng.standard_normal((3, 4))}
check_layer(gelu_forward, gelu_backward, x_gelu, ("x",)).assert_ok(1e-7)  # the real one passes
try:
    check_layer(gelu_forward, gelu_backward_forgetting_tanh, x_gelu, ("x",)).assert_ok(1e-7)
except GradCheckError as err:
    print("caught:", err)
else:
    raise AssertionError("the planted bug passed the gradient check")

# %% [markdown]
# ## Where LoRA plugs in
#
# Every linear layer of a block goes through two methods of the model, `linear_forward(name, x)`
# and `linear_backward(name, dout, cache, grads)`. A frozen weight still passes its gradient to
# the input, but its own gradient is skipped (`compute_dW=False`):

# %%
print(inspect.getsource(GPT.linear_forward))
print(inspect.getsource(GPT.linear_backward))

# %% [markdown]
# `LoraGPT` (made by `add_lora`) overrides exactly these two: for an adapted module it calls
# `lora_linear_forward` / `lora_linear_backward` from notebook 1, which add the `s (x A^T) B^T`
# path and return dA and dB. Nothing else in the model changes. With `"all-linear"`, the four
# linear layers of every block are adapted (the output head, tied to the embedding, is not):

# %%
lora_config = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
print(format_table(lora_parameter_table(lora_config, tiny)))

# %% [markdown]
# At LoRA's initialisation (`lora_B = 0`) the adapted model computes exactly the base's logits.
# To check the gradients, `init="random"` gives `lora_B` non-zero values too (otherwise dA would be
# zero and its check would test nothing, as notebook 1 showed). Only the adapter is trainable, so
# `backward` returns gradients for `lora_A` and `lora_B` alone.

# %%
lora_model = add_lora(tiny_model, lora_config)
assert np.array_equal(lora_model.forward(idx_tiny)[0], tiny_model.forward(idx_tiny)[0])

random_config = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init="random")
lora_check_model = add_lora(tiny_model, random_config, seed=1)
lora_directions = check_model(lora_check_model, idx_tiny, targets_tiny, mode="direction", n_samples=4)
print(
    f"trainable: {len(lora_directions.checks)} tensors, "
    f"{lora_check_model.num_parameters(trainable_only=True):,} of {lora_check_model.num_parameters():,} numbers; "
    f"worst relative error {lora_directions.max_error:.1e} ({lora_directions.worst().name})"
)
assert all(check.name.endswith((".lora_A", ".lora_B")) for check in lora_directions.checks)
lora_directions.assert_ok(1e-5)

# %% [markdown]
# What freezing buys, counted: `count_matmuls` records every matrix product. A full training step
# forms the (C_in, C_out) weight gradient of each of the 8 linear layers (and the head's); the LoRA
# step forms none of them, only the small (r, C_in) and (C_out, r) products of the factors.

# %%
C, V = tiny.n_embd, tiny.vocab_size
weight_shapes = {(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C), (C, V)}  # the linear layers' and the head's


def weight_gradient_products(model):
    with count_matmuls() as log:
        _, _, cache = model.forward(idx_tiny, targets_tiny)
        model.backward(cache)
    return sum(log.outputs_of_shape(shape) for shape in weight_shapes), log.flops


full_products, full_flops = weight_gradient_products(tiny_model)
lora_products, lora_flops = weight_gradient_products(lora_check_model)
print(
    f"full step: {full_products} products shaped like a weight matrix (weight gradients), {full_flops:,} FLOP"
)
print(
    f"LoRA step: {lora_products} such products, {lora_flops:,} FLOP ({lora_flops / full_flops:.0%} of the full step)"
)
assert full_products == 4 * tiny.n_layer + 1 and lora_products == 0  # + 1: the tied head's gradient

# %% [markdown]
# ## Summary
#
# - A GPT-2 block is LayerNorm, a linear layer, attention, a linear layer, a residual add, and the
#   same with a GELU MLP; its backward runs the same functions in reverse and *adds* gradients
#   where a value was used twice (the residual stream, the tied embedding). Chained by hand, they
#   reproduce `GPT.forward` and `GPT.backward` exactly.
# - The whole tiny model passes the finite-difference check (below 1e-5), and a planted bug fails it.
# - LoRA plugs into the two linear-layer hooks of the model; an adapted model passes the same
#   check, and its training step never forms a frozen weight's gradient.
