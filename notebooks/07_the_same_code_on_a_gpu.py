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
# # 7. The same code on a GPU
#
# minilora's layers are written once, against the NumPy API. CuPy implements the same API on a CUDA
# GPU, and every layer asks the arrays it was given for their module (`xp = get_xp(x)`), so the same
# functions run on either device. In this notebook we run one layer, one model and one LoRA training
# step on NumPy and on CuPy through the very same Python function objects, and compare CuPy's
# float32 with NumPy's float64. Then we see why both runs start from identical weights, how timing
# a GPU without synchronising measures nothing but a launch, and where the fused CUDA kernels plug
# in: through a named seam, above reference code that never imports them.
#
# It runs anywhere. Without CuPy or a GPU, each GPU cell says what it would check and skips; the
# NumPy float32 run stands in as the other side of every comparison, so every tolerance below is
# also tested on the CPU, against float32 rounding alone.
#
# Shape letters: B batch, T positions, C channels, V vocabulary, r LoRA rank.

# %%
# %matplotlib inline

# %%
import ast
import inspect
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minilora
from minilora import (
    GPT,
    SHIPPED_BASE,
    LoraConfig,
    TrainSettings,
    add_lora,
    get_preset,
    init_params,
    load_corpus,
    load_model,
)
from minilora.backend import BackendError, get_backend, get_xp, host_rng, synchronize, to_device, to_numpy
from minilora.fast.cpu.inference import use_one_blas_thread
from minilora.fast.cpu.ops import CPU_OPS
from minilora.fast.cuda.ops import CUDA_OPS  # importing the fast path's namespace never imports CuPy
from minilora.jobs.finetune import make_optimizer
from minilora.layers import REFERENCE_OPS, layernorm_backward, layernorm_forward
from minilora.training.batches import get_batch
from minilora.training.step import train_step

blas_threads = use_one_blas_thread()  # as a training step: a Jupyter kernel starts with one per core

# %% [markdown]
# ## Is there a GPU?
#
# `minilora.backend.get_backend("cuda")` is what every move to the GPU goes through (`to_device(x,
# "cuda")` calls it, so `--device cuda` does): it imports CuPy, checks that a GPU is visible, and
# otherwise raises a `BackendError` that says what is missing. We ask once, here; every GPU cell
# below reads `GPU`. Arrays go to the GPU through `to_device(x, "cuda")` (the
# current device, GPU 0 unless `CUDA_VISIBLE_DEVICES` says otherwise) and come back through
# `to_numpy`, the two functions the shim moves data with.

# %%
try:
    cupy = get_backend("cuda")
except BackendError as err:
    cupy, no_gpu_reason = None, str(err)
GPU = cupy is not None
if GPU:
    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    print(f"GPU: {properties['name'].decode()}, CuPy {cupy.__version__}")
else:
    print(f"no GPU: {no_gpu_reason}")
    print("The GPU cells below print what they would check and skip; the NumPy cells run and assert.")

# %% [markdown]
# Every comparison below runs the same code on the host in float64 (the reference) and then in each
# float32 run of `RUNS`: NumPy float32 always, CuPy float32 when there is a GPU. A run's inputs are
# the reference's host arrays, cast on the host and moved with `to_device`. The gap between two
# results is measured as in `tests/test_cuda.py`: `max|got - want| / max|want|`, on the host in
# float64.

# %%
REFERENCE_RUN = ("cpu", np.float64)  # (device, dtype): every float32 result is compared against this
RUNS = {"NumPy float32": ("cpu", np.float32)}  # float32 rounding alone, on the CPU
if GPU:
    RUNS["CuPy float32"] = ("cuda", np.float32)
SKIPPED = [] if GPU else ["CuPy float32"]


def moved(arrays: dict, device: str, dtype) -> dict:
    """Host arrays cast to ``dtype`` on the host, then moved to ``device`` (a no-op move for "cpu")."""
    return {name: to_device(value.astype(dtype), device) for name, value in arrays.items()}


def relative_gap(got, want) -> float:
    """max|got - want| / max|want| on the host in float64 (the measure of tests/test_cuda.py)."""
    got, want = to_numpy(got).astype(np.float64), to_numpy(want).astype(np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


def report_skipped(what: str) -> None:
    for run in SKIPPED:
        print(f"{run:<14} skipped (no GPU): would {what}")


# %% [markdown]
# ## One layer, both backends
#
# LayerNorm from `minilora.layers`, forward and backward. The function never names numpy or cupy:
# it takes the module from its input. These are its lines that touch `xp`:

# %%
print("\n".join(line for line in inspect.getsource(layernorm_forward).splitlines() if "xp" in line))

# %% [markdown]
# The same two function objects run on every backend. float32 keeps 24 bits of significand (a
# relative rounding of 6e-8); the means over C = 256 channels and the sums of dw and db over the
# 512 rows grow that to around 1e-6, so we allow 1e-5 of each result's largest value.

# %%
LAYER_TOL = 1e-5  # relative to the largest value: float32 against float64, one layer
rng = np.random.default_rng(0)
B, T, C = 8, 64, 256
layer_inputs = {  # a gain away from 1 and a bias away from 0, so that every term counts
    "x": rng.standard_normal((B, T, C)),
    "w": 1.0 + 0.1 * rng.standard_normal(C),
    "b": 0.1 * rng.standard_normal(C),
    "dout": rng.standard_normal((B, T, C)),  # a random upstream gradient
}


def layer_run(arrays: dict) -> dict:
    out, cache = layernorm_forward(arrays["x"], arrays["w"], arrays["b"])
    dx, dw, db = layernorm_backward(arrays["dout"], cache)
    return {"out": out, "dx": dx, "dw": dw, "db": db}


layer_reference = layer_run(moved(layer_inputs, *REFERENCE_RUN))
for run, (device, dtype) in RUNS.items():
    result = layer_run(moved(layer_inputs, device, dtype))
    gaps = {}
    for name, value in result.items():
        want = layer_reference[name]
        assert get_xp(value) is get_backend(device), name  # the result lives where its input did
        assert value.shape == want.shape and value.dtype == dtype, name
        gaps[name] = relative_gap(value, want)
        assert gaps[name] < LAYER_TOL, (run, name, gaps[name])
    module = get_xp(result["out"]).__name__
    print(f"{run:<14} arrays of {module}: " + ", ".join(f"{name} {gap:.1e}" for name, gap in gaps.items()))
report_skipped(f"run the same layernorm_forward/backward on CuPy arrays, gaps below {LAYER_TOL:g}")

# %% [markdown]
# ## One model, traced
#
# A whole forward and backward of the `tiny` preset (2 blocks, 64 channels), with every parameter
# moved away from its initialisation (so that no gradient path is accidentally zero). The model
# calls its layers through `model.ops`, a namespace of functions (`minilora.layers.ops.LayerOps`).
# To see *which* functions run, we hand the model a copy of its namespace in which each function
# first writes itself into a list. The GPU model gets the reference namespace too: nothing about a
# model changes with its device but the module of its arrays.
#
# The tolerances are those of `tests/test_cuda.py`: logits within 2e-4 of the largest logit, the
# loss within 1e-4, each gradient within 1e-3 of its largest value.

# %%
LOGITS_TOL, LOSS_TOL, GRAD_TOL = 2e-4, 1e-4, 1e-3  # float32 against float64, a whole model


def recording(ops, calls: list):
    """``ops`` with every function wrapped to append (its name, the function itself) to ``calls`` first."""

    def wrapped(name, function):
        def call(*args, **kwargs):
            calls.append((name, function))
            return function(*args, **kwargs)

        return call

    names = [field.name for field in fields(ops) if field.name != "name"]
    return replace(
        ops, name=f"{ops.name}, recorded", **{name: wrapped(name, getattr(ops, name)) for name in names}
    )


tiny = get_preset("tiny")
rng = np.random.default_rng(1)
tiny_params = init_params(tiny, seed=0, dtype=np.float64)
for value in tiny_params.values():
    value += 0.05 * rng.standard_normal(value.shape)  # moved away from the initialisation
idx, targets = rng.integers(0, tiny.vocab_size, (2, 4, 64))  # (B, T) each, on the host


def model_run(device, dtype):
    model = GPT(tiny, moved(tiny_params, device, dtype))
    assert model.ops is REFERENCE_OPS  # every model starts with the reference layers, on any device
    calls = []
    model.ops = recording(model.ops, calls)
    logits, loss, cache = model.forward(idx, targets)
    return model, logits, loss, model.backward(cache), calls


ref_model, ref_logits, ref_loss, ref_grads, ref_calls = model_run(*REFERENCE_RUN)
grad_gaps = {}
for run, (device, dtype) in RUNS.items():
    model, logits, loss, grads, calls = model_run(device, dtype)
    assert type(model) is type(ref_model) and model.xp is get_backend(device)
    assert len(calls) == len(ref_calls)
    # the same function objects, called in the same order
    assert all(ran is ran_ref for (_, ran), (_, ran_ref) in zip(calls, ref_calls))
    assert logits.shape == ref_logits.shape and logits.dtype == dtype
    assert relative_gap(logits, ref_logits) < LOGITS_TOL and abs(float(loss) - float(ref_loss)) < LOSS_TOL
    assert list(grads) == list(ref_grads)
    grad_gaps[run] = {name: relative_gap(grads[name], ref_grads[name]) for name in ref_grads}
    for name, grad in grads.items():
        assert grad.shape == ref_grads[name].shape and grad.dtype == dtype, name
        assert grad_gaps[run][name] < GRAD_TOL, (run, name, grad_gaps[run][name])
    print(
        f"{run:<14} {len(calls)} layer calls, each the same function object as in the float64 run "
        f"({len({id(f) for _, f in calls})} distinct); logits {relative_gap(logits, ref_logits):.1e}, "
        f"loss {abs(float(loss) - float(ref_loss)):.1e}, worst of {len(grads)} gradients "
        f"{max(grad_gaps[run].values()):.1e}"
    )
report_skipped(
    f"trace the same {len(ref_calls)} function objects on CuPy arrays and compare with these tolerances"
)

# %%
fig, ax = plt.subplots(figsize=(9, 3.4))
names = list(ref_grads)
width = 0.8 / len(grad_gaps)  # one bar per float32 run and gradient
for i, (run, gaps) in enumerate(grad_gaps.items()):
    offset = (i - (len(grad_gaps) - 1) / 2) * width
    ax.bar(np.arange(len(names)) + offset, [gaps[name] for name in names], width=width, label=run)
ax.axhline(GRAD_TOL, color="red", ls="--", label=f"tolerance {GRAD_TOL:g}")
ax.set_yscale("log")
ax.set_xticks(
    range(len(names)), [name.removeprefix("transformer.") for name in names], rotation=90, fontsize=7
)
ax.set_ylabel("gap to NumPy float64")
ax.set_title("tiny preset: each gradient in float32 against float64" + ("" if GPU else " (no GPU here)"))
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## Identical starts: weights are drawn on the host
#
# CuPy has its own random generators, and they give other numbers than NumPy's for the same seed.
# A GPU run that drew its own weights would start somewhere else, and nothing could be compared.
# So minilora draws every initial weight (and every batch) on the host from a seeded
# `numpy.random.Generator` and then moves it; these are `init_params`'s lines that do it:

# %%
print(
    "\n".join(
        line for line in inspect.getsource(init_params).splitlines() if "rng" in line or "to_device" in line
    )
)

# %% [markdown]
# The draws are float64, cast to the model's dtype: a float32 model starts at its float64 twin's
# numbers rounded, and at the initial loss to rounding.

# %%
start32 = init_params(tiny, seed=0)  # float32, on the host
start64 = init_params(tiny, seed=0, dtype=np.float64)
assert all(np.array_equal(start32[name], start64[name].astype(np.float32)) for name in start64)
start_loss = {
    "NumPy float64": float(GPT(tiny, start64).forward(idx, targets)[1]),
    "NumPy float32": float(GPT(tiny, start32).forward(idx, targets)[1]),
}
print(f"{len(start32)} tensors: the float32 start is the float64 draw rounded, element for element")

# %% [markdown]
# On a GPU, `init_params(..., device="cuda")` moves the same host draws: the GPU's weights must be
# *identical*, bit for bit, to the CPU's float32 weights, and its initial loss equal to rounding.
# CuPy's own generator, seeded alike, gives other numbers.

# %%
if GPU:
    start_gpu = init_params(tiny, seed=0, device="cuda")
    for name, value in start_gpu.items():
        assert get_xp(value) is cupy and np.array_equal(to_numpy(value), start32[name]), name
    print(f"{len(start_gpu)} tensors on the GPU, identical to the CPU's float32 weights")
    start_loss["CuPy float32"] = float(GPT(tiny, start_gpu).forward(idx, targets)[1])
    from_numpy = np.random.default_rng(0).random(4, dtype="float32")
    from_cupy = to_numpy(cupy.random.default_rng(0).random(4, dtype="float32"))
    print(f"seed 0, NumPy's generator: {np.round(from_numpy, 4)}; CuPy's: {np.round(from_cupy, 4)}")
    assert not np.array_equal(from_numpy, from_cupy)
else:
    print(
        "skipped (no GPU): would move the same host draws with init_params(..., device='cuda'), assert every "
        "tensor equal bit for bit to the CPU's float32 weights, and show CuPy's own generator drawing other numbers"
    )
for run, loss in start_loss.items():
    gap = abs(loss - start_loss["NumPy float64"])
    print(f"{run:<14} initial loss {loss:.7f} (ln V = {np.log(tiny.vocab_size):.7f}), {gap:.1e} from float64")
    assert gap < 1e-5  # rounding: 1e-5 is about 20 float32 ulps at 5.5
# GPT-2's initial weights are small, so the first predictions are nearly uniform: a loss near ln V
assert abs(start_loss["NumPy float64"] - np.log(tiny.vocab_size)) < 0.05

# %% [markdown]
# ## One LoRA step
#
# Now a real training step: the shipped base model (6 blocks, 256 channels, pretrained on
# Shakespeare), a rank-8 adapter on `c_attn` and `attn.c_proj`, one batch of First Folio text
# (B = 4 windows of T = 128 bytes, drawn on the host), and `minilora.training.step.train_step`,
# the same function on every backend: forward, backward, gradient clipping, AdamW.
#
# The adapter is drawn on the host too, so the GPU's `lora_A` equals the CPU's exactly; the float64
# reference is given the same float32 numbers. The base's weights are stored in float16, which
# float32 and float64 both hold exactly.

# %%
folio = load_corpus("shakespeare_folio")
x, y = get_batch(folio.train, 4, 128, host_rng(0))  # (B, T) int64 each, on the host
lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "attn.c_proj"])
settings = TrainSettings(lr=5e-3, weight_decay=0.0, grad_clip=1.0)
adapter_start = add_lora(load_model(SHIPPED_BASE), lora_config, seed=0)  # CPU float32: the adapter's start


def lora_model(device, dtype):
    model = add_lora(load_model(SHIPPED_BASE, device=device, dtype=dtype), lora_config, seed=0)
    assert model.ops is REFERENCE_OPS  # the reference layers, on every backend
    for name in model.trainable_names:
        if dtype == np.float32:  # drawn on the host and moved: the same start on every device
            assert np.array_equal(to_numpy(model.params[name]), adapter_start.params[name]), name
        else:
            model.params[name][...] = adapter_start.params[name]  # the reference starts at the same numbers
    return model


def lora_run(device, dtype):
    model = lora_model(device, dtype)
    _, _, cache = model.forward(x, y)
    grads = model.backward(cache)  # what train_step's backward computes, kept to compare
    step_loss = train_step(model, make_optimizer(model, settings), x, y, settings.lr, settings.grad_clip)
    loss_after = model.forward(x, y)[1]  # the same batch after the update
    return model, grads, float(step_loss), float(loss_after)


ref_lora, ref_lora_grads, ref_step_loss, ref_loss_after = lora_run(*REFERENCE_RUN)
print(f"float64 reference: loss {ref_step_loss:.6f} before the step, {ref_loss_after:.6f} after it")
print(
    f"trainable: {len(ref_lora.trainable_names)} tensors, {ref_lora.num_parameters(trainable_only=True):,} numbers"
)

# %% [markdown]
# What to compare, and why not everything element for element:
#
# - the loss `train_step` returns (the forward's, before the update) and the gradients, with the
#   tolerances above;
# - `lora_A`: at LoRA's start `lora_B = 0`, so dA is exactly zero (notebook 1) and, without weight
#   decay, AdamW leaves `lora_A` exactly where it was, on every backend;
# - `lora_B`: Adam's first update is `lr * g / (|g| + eps)`, about `lr * sign(g)`. Where a
#   gradient element is near zero, at the float32 noise floor, its sign is rounding, and float32
#   and float64 may step opposite ways: a difference of 2 lr in that element, which says nothing
#   about the code. So we compare the update where `|g| > 1e-3 max|g|`, far above float32's
#   rounding of the gradient, and count the elements left out. There, a gradient error within the
#   tolerance above moves the update by less than 5e-3 lr on this batch (the derivative of
#   `g / (|g| + eps)` is `eps / (|g| + eps)^2`, small once `|g|` is far above eps = 1e-8), and we
#   allow 1e-2 lr;
# - the loss after the step on the same batch. Elements with a near-zero gradient hardly move the
#   loss, whichever way they step, so it agrees to float32 rounding like the rest.

# %%
UPDATE_TOL = 1e-2  # of lr: Adam's update where the gradient's sign is sure (a flipped sign: 2 lr)
for run, (device, dtype) in RUNS.items():
    model, grads, step_loss, loss_after = lora_run(device, dtype)
    assert model.xp is get_backend(device) and list(grads) == list(ref_lora_grads)
    assert abs(step_loss - ref_step_loss) < LOSS_TOL and abs(loss_after - ref_loss_after) < LOSS_TOL
    assert loss_after < step_loss  # the step lowered the loss of its batch
    worst_grad, worst_update, left_out, compared = 0.0, 0.0, 0, 0
    for name, want in ref_lora_grads.items():
        worst_grad = max(worst_grad, relative_gap(grads[name], want))
        assert relative_gap(grads[name], want) < GRAD_TOL, (run, name)
        after = to_numpy(model.params[name])
        if name.endswith(".lora_A"):
            assert not to_numpy(grads[name]).any() and not want.any()  # dA = 0 exactly while lora_B = 0
            assert np.array_equal(after, adapter_start.params[name]), name  # so lora_A did not move
            continue
        sure = np.abs(want) > 1e-3 * np.max(np.abs(want))  # the sign of g is not rounding
        # lora_B started at 0, so its value after the step is the update
        gap = np.abs(after.astype(np.float64) - ref_lora.params[name])[sure]
        worst_update = max(worst_update, float(gap.max()) / settings.lr)
        left_out, compared = left_out + int((~sure).sum()), compared + int(sure.sum())
        assert gap.max() < UPDATE_TOL * settings.lr, (run, name, gap.max())
    print(
        f"{run:<14} loss before {step_loss:.6f}, after {loss_after:.6f}; worst gradient gap {worst_grad:.1e}; "
        f"lora_A unchanged; lora_B's update within {worst_update:.1e} lr on {compared:,} elements "
        f"(and {left_out:,} with |g| < 1e-3 max|g| left out)"
    )
report_skipped(
    f"run the same train_step on CuPy and compare: losses {LOSS_TOL:g}, gradients {GRAD_TOL:g}, "
    f"update {UPDATE_TOL:g} lr"
)

# %% [markdown]
# ## The timing trap: a GPU call returns before the work is done
#
# A CuPy call queues its kernel on the GPU and returns at once; the GPU works through the queue
# while Python goes on. A clock read right after `c = a @ b` measures the launch, not the product.
# `minilora.backend.synchronize(xp)` waits for the queue to empty (`cupy.cuda.Device().synchronize()`;
# on NumPy it does nothing), and reading a value back to the host (`float(c[0, 0])`) waits too,
# which is why the training loop reads its loss only every `log_interval` steps. CUDA events
# measure on the GPU's own clock: one recorded before the product, one after, and the time between.
#
# The same timing function runs on both backends; each timed product starts on an idle device.


# %%
def product_times(xp, n: int, repeats: int = 7) -> dict:
    """Median seconds of an (n, n) @ (n, n) float32 product: unsynchronised, synchronised, and read back."""
    device = "cpu" if xp is np else "cuda"
    a, b = (to_device(host_rng(0, k).standard_normal((n, n), dtype=np.float32), device) for k in (1, 2))
    for _ in range(3):  # warm-up: the BLAS handle, the memory pool's blocks
        c = a @ b
    synchronize(xp)
    times = {"no synchronize": [], "synchronize": [], "read a value": []}
    for _ in range(repeats):
        for how, seconds in times.items():
            synchronize(xp)  # start with nothing queued
            started = time.perf_counter()
            c = a @ b
            if how == "synchronize":
                synchronize(xp)
            elif how == "read a value":
                float(c[0, 0])  # a copy to the host, which waits for the product
            seconds.append(time.perf_counter() - started)
            synchronize(xp)
    return {how: float(np.median(seconds)) for how, seconds in times.items()}


def show_times(times: dict, n: int) -> None:
    for how, seconds in times.items():
        print(f"  {how:<15} {seconds * 1e3:9.3f} ms, i.e. {2 * n**3 / seconds / 1e12:9.2f} TFLOP/s apparent")


N_CPU = 768
cpu_times = product_times(np, N_CPU)
print(f"NumPy, ({N_CPU}, {N_CPU}) @ ({N_CPU}, {N_CPU}), {2 * N_CPU**3 / 1e9:.2f} GFLOP:")
show_times(cpu_times, N_CPU)
assert cpu_times["no synchronize"] > 0.2 * cpu_times["synchronize"]  # NumPy returns when the work is done

# %% [markdown]
# On the GPU the product is 4096 wide (137 GFLOP, a few milliseconds on a data-centre GPU): the
# unsynchronised time must be a small fraction of the synchronised one, and its "TFLOP/s" beyond
# any GPU.

# %%
N_GPU = 4096
if GPU:
    gpu_times = product_times(cupy, N_GPU)
    a, b = (
        to_device(host_rng(0, k).standard_normal((N_GPU, N_GPU), dtype=np.float32), "cuda") for k in (1, 2)
    )
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    event_ms = []
    for _ in range(7):
        start.record()
        c = a @ b
        end.record()
        end.synchronize()  # wait until the GPU has passed the second event
        event_ms.append(cupy.cuda.get_elapsed_time(start, end))  # milliseconds between the two events
    gpu_times["CUDA events"] = float(np.median(event_ms)) / 1e3
    print(f"CuPy, ({N_GPU}, {N_GPU}) @ ({N_GPU}, {N_GPU}), {2 * N_GPU**3 / 1e9:.0f} GFLOP:")
    show_times(gpu_times, N_GPU)
    launch = gpu_times["no synchronize"]
    for how in ("synchronize", "read a value", "CUDA events"):
        assert gpu_times[how] > 5 * launch, (how, gpu_times[how], launch)  # the work, not the launch
else:
    print(
        f"skipped (no GPU): would time a ({N_GPU}, {N_GPU}) float32 product on CuPy without synchronising, "
        "with synchronize(), reading a value back, and with CUDA events, and assert that each of the last "
        "three is over 5 times the first"
    )

# %% [markdown]
# ## Where the fused kernels plug in
#
# The reference (layers, model, LoRA, optimiser, training loop) is plain array code. The fast path,
# `minilora.fast`, plugs in from above through seams the reference names:
#
# - **`model.ops`**, the `LayerOps` namespace a model calls its layers through. `REFERENCE_OPS`
#   holds the readable functions of `minilora.layers`; the fast path builds its own namespaces with
#   some forward/backward pairs swapped: `CPU_OPS` (the same formulas in fewer passes over memory)
#   and `CUDA_OPS` (fused CUDA kernels). An adapted model has a second namespace of the same kind,
#   `model.lora_ops` (`minilora.lora.ops.LoraOps`) for its adapter layers.
# - **`backend.register_matmul`**, through which the CUDA path routes every product of CuPy arrays
#   to its own cuBLAS handle (one that a CUDA graph can record).
# - **`train_loop(..., step=...)`**, the `TrainingStep` that does one batch's work in two halves,
#   `forward_backward` then `apply_update`: the reference's, or on a GPU the first half captured
#   once as a CUDA graph and replayed and the second fused.
#
# `minilora.fast.accelerate(model, optimizer, grad_clip)` makes all three choices for a model's
# device. Here is the first seam, field by field, with how often the tiny model's training step
# (traced above) calls each function; a blank means the reference function stays.

# %%
op_names = [field.name for field in fields(REFERENCE_OPS) if field.name != "name"]
calls_per_step = Counter(name for name, _ in ref_calls)


def where(ops, name: str) -> str:
    function = getattr(ops, name)
    return "" if function is getattr(REFERENCE_OPS, name) else function.__module__.removeprefix("minilora.")


print(f"{'LayerOps field':<30}{'calls':>6}  {'REFERENCE_OPS':<24}{'CPU_OPS':<20}CUDA_OPS")
for name in op_names:
    reference = getattr(REFERENCE_OPS, name).__module__.removeprefix("minilora.")
    calls = calls_per_step[name] or ""
    print(f"{name:<30}{calls:>6}  {reference:<24}{where(CPU_OPS, name):<20}{where(CUDA_OPS, name)}")

# %%
fused = {name for name in op_names if getattr(CUDA_OPS, name) is not getattr(REFERENCE_OPS, name)}
gpt_pairs = ("gelu", "layernorm", "attention", "cross_entropy")
llama_pairs = ("rmsnorm", "swiglu", "rope", "gqa_attention")
# Two forwards go alone: the residual add has no backward, and the linear forward (its bias added
# by a vectorised kernel) makes the reference's own cache, which the reference backward takes.
forward_only = {"residual_add", "linear_forward"}
pairs = {f"{pair}_{way}" for pair in gpt_pairs + llama_pairs for way in ("forward", "backward")}
assert fused == pairs | forward_only
for name in op_names:  # a forward and its backward are swapped together, or neither is
    if name.endswith("_forward") and name.removesuffix("_forward") + "_backward" in op_names:
        if name not in forward_only:
            assert (name in fused) == (name.removesuffix("_forward") + "_backward" in fused), name
for name in op_names:
    assert getattr(REFERENCE_OPS, name).__module__.startswith("minilora.layers."), name
    assert getattr(CUDA_OPS, name).__module__.startswith(
        "minilora.fast.cuda." if name in fused else "minilora.layers."
    ), name
fused_calls = sum(count for name, count in calls_per_step.items() if name in fused)
print(
    f"CUDA_OPS swaps {len(fused)} of {len(op_names)} functions: the pairs {', '.join(gpt_pairs)} (and "
    f"the Llama family's {', '.join(llama_pairs)}), and the forwards {', '.join(sorted(forward_only))}; "
    "the linear backward, embedding and dropout stay the reference's (cuBLAS products or one indexing pass)"
)
print(f"of the tiny step's {len(ref_calls)} layer calls, {fused_calls} would run fused kernels on a GPU")

# %% [markdown]
# On a GPU, `accelerate` hands the model `CUDA_OPS`, routes its products through minilora's cuBLAS
# handle and returns a `GraphedStep`: one eager warm-up step, then the step captured as a CUDA graph
# and replayed. Five steps of it must track five reference `train_step`s (reference layers, eager)
# on a copy of the same small LoRA model, to float32 rounding: the check of
# `tests/test_cuda_graph.py`, with its tolerances.

# %%
if GPU:
    from minilora.config import GPTConfig
    from minilora.fast import accelerate
    from minilora.fast.cuda.graph import GraphedStep

    small = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)

    def small_lora():
        model = add_lora(
            GPT(small, init_params(small, seed=1, device="cuda")),
            LoraConfig(r=4, target_modules=("c_attn", "attn.c_proj"), init="random"),
            seed=2,
        )
        return model, make_optimizer(model, TrainSettings(lr=1e-2, weight_decay=0.1))

    fast_model, fast_optimizer = small_lora()
    eager_model, eager_optimizer = small_lora()
    fast_step = accelerate(fast_model, fast_optimizer, grad_clip=1.0, graph_warmup=1)
    assert isinstance(fast_step, GraphedStep) and fast_model.ops is CUDA_OPS
    assert eager_model.ops is REFERENCE_OPS  # the copy that trains with the reference train_step
    batches = np.random.default_rng(3)
    for i in range(5):
        xb, yb = batches.integers(0, 256, (4, 16)), batches.integers(0, 256, (4, 16))
        fast_loss = float(fast_step(fast_model, fast_optimizer, xb, yb, None, 1.0))
        eager_loss = float(train_step(eager_model, eager_optimizer, xb, yb, None, 1.0))
        print(f"step {i + 1}: graph with CUDA_OPS {fast_loss:.6f}, reference train_step {eager_loss:.6f}")
        assert abs(fast_loss - eager_loss) <= 1e-5 * abs(eager_loss)
    assert fast_step.graph is not None  # the later steps were replays of the captured graph
    for name in eager_model.trainable_names:
        np.testing.assert_allclose(
            to_numpy(fast_model.params[name]),
            to_numpy(eager_model.params[name]),
            rtol=1e-4,
            atol=1e-6,
            err_msg=name,
        )
    print(f"after 5 steps, all {len(eager_model.trainable_names)} adapter tensors agree (rtol 1e-4)")
else:
    print(
        "skipped (no GPU): would call accelerate() on a small LoRA model, assert it now uses CUDA_OPS and a "
        "GraphedStep, and compare 5 graph-replayed steps with 5 reference train_steps (losses 1e-5, adapters 1e-4)"
    )

# %% [markdown]
# ## The reference never imports the fast path
#
# The seams only work one way if the reference cannot see what plugs into it. First, in a fresh
# interpreter: import every reference module and list what got loaded. One detail: `import
# minilora.model` first runs `minilora/__init__.py`, the facade that re-exports the whole public
# API, `fit` included, and `fit` lives in `minilora.jobs.finetune`, above the reference (it calls
# `accelerate`). So the fresh interpreter registers the `minilora` package without running its
# `__init__.py` (as `tests/test_architecture.py` leaves the facade out of its import graph), then
# imports the reference modules by name. As a control, the same interpreter trick importing
# `minilora.fast.cuda.ops` must load the fast path (and still not CuPy).

# %%
FRESH_INTERPRETER = """
import importlib, importlib.util, json, sys, types
spec = importlib.util.find_spec("minilora")
package = types.ModuleType("minilora")  # the package, without running its __init__.py (the facade)
package.__path__ = list(spec.submodule_search_locations)
sys.modules["minilora"] = package
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("minilora", "cupy"))))
"""
REFERENCE_MODULES = [
    "minilora.backend",
    "minilora.layers",
    "minilora.model",
    "minilora.llama",
    "minilora.lora",
    "minilora.optim",
    "minilora.gradcheck",
    "minilora.generate",
    "minilora.quant",
    "minilora.training.loop",
    "minilora.training.evaluate",
]


def loaded_after_importing(modules: list) -> list:
    result = subprocess.run(
        [sys.executable, "-c", FRESH_INTERPRETER, *modules], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


reference_loads = loaded_after_importing(REFERENCE_MODULES)
fast_loads = loaded_after_importing(["minilora.fast.cuda.ops"])
print(f"the reference modules load {len(reference_loads)} modules, from these parts of minilora:")
print("  " + ", ".join(sorted({".".join(m.split(".")[:2]) for m in reference_loads})))
print(
    f"minilora.fast.cuda.ops loads {sum(m.startswith('minilora.fast') for m in fast_loads)} modules of minilora.fast"
)
assert "minilora.model" in reference_loads and "minilora.lora.model" in reference_loads
assert not any(m.startswith("minilora.fast") for m in reference_loads)
assert "minilora.fast.cuda.kernels.layernorm" in fast_loads  # the control: the check can see the fast path
assert not any(m.split(".")[0] == "cupy" for m in reference_loads + fast_loads)

# %% [markdown]
# An interpreter only runs the imports at the top of a file; an import inside a function (a lazy
# import) runs when the function is called. So, second, read every import statement of the
# reference's files with `ast`, at module level or inside a function, relative ones resolved, and
# `importlib.import_module("...")` calls too. None may name `minilora.fast`. The control this time is
# `minilora/jobs/finetune.py`, which must be seen importing it. (`tests/test_architecture.py` does
# this for the whole package, following chains of imports and looking for cycles.)

# %%
PACKAGE_DIR = Path(minilora.__file__).parent
REFERENCE_FILES = ("backend", "config", "language_model", "model", "llama", "optim", "gradcheck", "generate")
REFERENCE_FOLDERS = ("layers", "lora", "quant", "training")  # every file below each
REFERENCE_PATHS = [PACKAGE_DIR / f"{name}.py" for name in REFERENCE_FILES] + [
    path for folder in REFERENCE_FOLDERS for path in sorted((PACKAGE_DIR / folder).rglob("*.py"))
]


def imported_modules(path: Path) -> list:
    """Every module an import in the file names (the module, and module.name for each name imported from it)."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    package = ".".join(parts[:-1])  # what a relative import starts from (for an __init__.py, its own package)
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""  # `from ..x import y`
            base = ".".join(part for part in (base, node.module) if part)
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and "import_module" in (
            getattr(node.func, "attr", None),  # importlib.import_module("...")
            getattr(node.func, "id", None),  # import_module("...")
        ):
            names += [arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant)]
    return names


reference_imports = {path: imported_modules(path) for path in REFERENCE_PATHS}
crossing = [
    f"{path.relative_to(PACKAGE_DIR.parent)}: {name}"
    for path, names in reference_imports.items()
    for name in names
    if name.startswith("minilora.fast")
]
control = [
    name
    for name in imported_modules(PACKAGE_DIR / "jobs" / "finetune.py")
    if name.startswith("minilora.fast")
]
print(
    f"{len(REFERENCE_PATHS)} reference files, {sum(map(len, reference_imports.values()))} imported names, "
    f"{len(crossing)} of them in minilora.fast; the control, jobs/finetune.py, imports {sorted(set(control))}"
)
assert len(REFERENCE_PATHS) >= 30 and not crossing, crossing
assert "minilora.fast.accelerate" in control

# %% [markdown]
# ## Summary
#
# - One set of functions: LayerNorm, the whole GPT forward and backward (the same function objects,
#   call for call) and a LoRA `train_step` run on NumPy and on CuPy arrays alike, because each
#   function asks its inputs for their array module. CuPy float32 agrees with NumPy float64 within
#   stated tolerances (1e-5 for a layer; 2e-4, 1e-4 and 1e-3 for a model's logits, loss and
#   gradients), the same tolerances that NumPy float32 meets on the CPU.
# - Identical starts: weights, adapters and batches are drawn on the host from seeded NumPy
#   generators and moved, so a GPU model starts bit for bit where the CPU model does (CuPy's own
#   generator would not).
# - After Adam's first step, compare where a gradient's sign is not rounding, and compare the loss.
# - A GPU call returns before its work is done: time with `synchronize`, a value read back, or CUDA
#   events, never with a bare clock around the call.
# - The fused kernels plug in through `model.ops` (`CUDA_OPS` swaps GELU, LayerNorm, attention and
#   cross-entropy in forward/backward pairs, and the residual and bias adds),
#   `backend.register_matmul` and `train_loop(step=...)`; the reference imports none of it.
