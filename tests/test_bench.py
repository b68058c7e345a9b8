"""The benchmark harness: FLOP formulas against counted matmuls, the JSON fields (the memory ledger's among
them; the ledger itself is tested in test_memory_ledger.py), and the PyTorch peer's loss, gradients and
AdamW step against minilora's in float64.

No test here reads a clock: benchmarks are never timed tests.
"""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from minilora.backend import count_matmuls
from minilora.cli import bench_command
from minilora.config import GPTConfig, get_preset
from minilora.fast.cpu.ops import CPU_OPS
from minilora.jobs.finetune import ADAM_BETAS, make_optimizer
from minilora.lab.bench import (
    BENCH_BATCH_SIZES,
    DEFAULT_LORA,
    OPENBLAS_ENV_VARS,
    BenchError,
    BenchSettings,
    load_torch_peer,
    run_bench,
    step_flops,
)
from minilora.lab.memory import memory_ledger
from minilora.layers import REFERENCE_OPS
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.optim import clip_grad_norm
from minilora.training.loop import TrainSettings

TINY = get_preset("tiny")
ATTN_LORA = LoraConfig(r=8, target_modules=("c_attn", "attn.c_proj"))


def batch(config, B, T, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))


def build(config, lora_config=None, dtype=np.float32, seed=0):
    model = GPT(config, init_params(config, seed=seed, dtype=dtype))
    return model if lora_config is None else add_lora(model, lora_config, seed=seed)


@pytest.mark.parametrize(
    "config, lora_config, T",
    [
        (TINY, None, 64),
        (TINY, ATTN_LORA, 64),
        (TINY, LoraConfig(r=4, target_modules="all-linear"), 64),
        (
            GPTConfig(n_layer=3, n_head=4, n_embd=32, block_size=32),
            LoraConfig(r=2, target_modules=("mlp.c_fc",)),
            20,
        ),
    ],
)
def test_step_flops_equal_the_counted_matmuls_of_a_training_step(config, lora_config, T):
    """The formula counts what the code multiplies, attention over the full T x T and the tied head included."""
    model = build(config, lora_config)
    idx, targets = batch(config, 3, T)
    with count_matmuls() as forward:
        _, _, cache = model.forward(idx, targets)
    with count_matmuls() as backward:
        model.backward(cache)
    flops = step_flops(config, 3, T, lora_config)
    assert forward.flops == flops["forward"]
    assert backward.flops == flops["backward"]
    assert flops["total"] == forward.flops + backward.flops


def test_full_backward_is_twice_the_forward_and_lora_skips_every_frozen_dW():
    config, B = get_preset("medium"), BENCH_BATCH_SIZES["medium"]
    full, lora = step_flops(config, B), step_flops(config, B, lora_config=ATTN_LORA)
    assert full["backward"] == 2 * full["forward"]
    # LoRA's backward: the dense products once (dx only), attention and the adapter twice
    assert (
        lora["backward"] == lora["dense_forward"] + 2 * lora["attention_forward"] + 2 * lora["lora_forward"]
    )
    N = B * config.block_size
    assert lora["lora_forward"] == 2 * N * 110_592  # r (C_in + C_out) summed: README's table, r = 8
    assert round(full["total"] / 1e9) == 292 and round(lora["total"] / 1e9) == 207  # the README's figures


def check_fields(result, settings):
    config = get_preset(settings.preset)
    B, T = settings.batch_shape()
    assert result["tokens_per_step"] == B * T == settings.batch_size * config.block_size
    assert result["flops_per_step"] == step_flops(config, B, T, settings.lora_config)["total"]
    model = build(config, settings.lora_config)
    assert result["params_total"] == model.num_parameters()
    assert result["params_trainable"] == model.num_parameters(trainable_only=True)
    times = result["step_time_s"]
    assert 0 < times["min"] <= times["median"] <= times["max"]
    assert result["tokens_per_s"] == pytest.approx(B * T / times["median"])
    assert result["achieved_gflops"] == pytest.approx(result["flops_per_step"] / times["median"] / 1e9)
    assert result["mfu"] == pytest.approx(result["achieved_gflops"] / result["matmul_peak_gflops"])
    assert len(result["runs_tokens_per_s"]) == settings.repeats
    assert result["peak_rss_bytes"] > 0 and result["peak_device_bytes"] is None  # CPU
    ops = (
        REFERENCE_OPS if settings.reference else CPU_OPS
    )  # the ledger probes the layer functions the bench ran
    ledger = memory_ledger(config, B, T, settings.lora_config, ops=ops)
    assert result["memory"]["ledger"] == ledger.to_dict()
    assert result["memory"]["traced_step_peak_bytes"] > 0
    assert set(result["openblas_env"]) == set(OPENBLAS_ENV_VARS)
    assert any(lib.get("user_api") == "blas" for lib in result["blas"])
    assert np.isfinite(result["loss_first"]) and np.isfinite(result["loss_last"])
    json.dumps(result)  # one JSON line


@pytest.mark.parametrize("full, reference", [(False, False), (True, False), (False, True)])
def test_a_tiny_bench_run_completes_with_every_field(full, reference):
    settings = BenchSettings(
        preset="tiny",
        lora_config=None if full else DEFAULT_LORA,
        batch_size=2,
        warmup=1,
        steps=2,
        repeats=2,
        peak_size=64,
        corpus=None,
        reference=reference,
    )
    result = run_bench(settings)
    check_fields(result, settings)
    assert result["mode"] == ("full" if full else "lora")
    assert result["layer_ops"] == ("reference" if reference else "cpu")
    assert result["peer"] is None and result["ratio"] is None


def test_bench_command_prints_one_json_line_and_appends_it_to_out(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="minilora")
    bench_command.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "bench.jsonl"
    args = parser.parse_args(
        [
            "bench",
            "--preset",
            "tiny",
            "--batch-size",
            "2",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--repeats",
            "1",
            "--peak-size",
            "64",
            "--corpus",
            "random",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    args.run(args)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["preset"] == "tiny" and result["targets"] == ["c_attn", "attn.c_proj"] and result["r"] == 8
    assert out.read_text() == lines[0] + "\n"


def test_bench_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="unknown preset"):
        BenchSettings(preset="huge")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        BenchSettings(steps=0)
    with pytest.raises(ValueError, match="full fine-tuning would need float32 master copies"):
        BenchSettings(dtype="bfloat16", lora_config=None)
    with pytest.raises(ValueError, match="dtype must be one of"):
        BenchSettings(dtype="float16")
    with pytest.raises(ValueError, match="runs on a GPU: add --device cuda"):
        run_bench(BenchSettings(preset="tiny", dtype="bfloat16", device="cpu"))


def test_the_peer_without_torch_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail as if it were not installed
    monkeypatch.delitem(sys.modules, "minilora.lab.torch_peer", raising=False)
    with pytest.raises(BenchError, match="pip install 'torch==2.13.0'"):
        load_torch_peer()


def test_minilora_never_imports_torch():
    code = (
        "import sys, minilora, minilora.lab.bench, minilora.lab.memory, minilora.cli.bench_command; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# The PyTorch peer: the same model, batches and optimiser, or the comparison is not apples to apples.


def peer_pair(lora_config, grad_clip=1.0, weight_decay=0.1, lr=1e-2):
    torch_peer = load_torch_peer()  # skips below if torch is missing
    config = TINY
    model = build(config, lora_config, dtype=np.float64, seed=3)
    optimizer = make_optimizer(model, TrainSettings(lr=lr, weight_decay=weight_decay))
    peer = torch_peer.TorchGPT(
        {
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_embd": config.n_embd,
            "vocab_size": config.vocab_size,
        },
        {name: value.copy() for name, value in model.params.items()},
        model.trainable_names,
        adapted=() if lora_config is None else tuple(model.adapted_modules),
        scaling=1.0 if lora_config is None else lora_config.scaling,
        lr=lr,
        betas=ADAM_BETAS,
        eps=optimizer.eps,
        weight_decay=weight_decay,
        decay_names=optimizer.decay_names,
        grad_clip=grad_clip,
        dtype="float64",
    )
    return model, optimizer, peer


@pytest.mark.parametrize(
    "lora_config", [None, LoraConfig(r=4, target_modules="all-linear", init="random")], ids=["full", "lora"]
)
def test_peer_loss_gradients_and_adamw_steps_equal_minilora_in_float64(lora_config):
    pytest.importorskip("torch")
    model, optimizer, peer = peer_pair(lora_config)
    idx, targets = batch(TINY, 4, 64, seed=1)
    _, loss, cache = model.forward(idx, targets)
    grads = model.backward(cache)
    peer_loss, peer_grads = peer.loss_and_grads(idx, targets)
    assert abs(peer_loss - float(loss)) <= 1e-12 * abs(float(loss))
    assert set(peer_grads) == set(grads)
    for name, grad in grads.items():
        np.testing.assert_allclose(
            peer_grads[name], grad, rtol=0, atol=1e-10 * np.abs(grad).max() + 1e-300, err_msg=name
        )
    for step in range(3):  # the same batches through both: clipping, weight decay and AdamW alike
        idx, targets = batch(TINY, 4, 64, seed=10 + step)
        _, loss, cache = model.forward(idx, targets)
        grads = model.backward(cache)
        clip_grad_norm(grads, 1.0)
        optimizer.step(grads)
        peer_loss = peer.step(idx, targets)
        assert abs(float(peer_loss) - float(loss)) <= 1e-12 * abs(float(loss))
    for name, value in peer.params_numpy().items():
        np.testing.assert_allclose(
            value, model.params[name], rtol=1e-9, atol=1e-10, err_msg=name
        )  # lr = 1e-2


def test_a_tiny_bench_run_with_the_peer_reports_both_and_the_ratio():
    pytest.importorskip("torch")
    settings = BenchSettings(
        preset="tiny", batch_size=2, warmup=1, steps=1, repeats=2, peak_size=64, peer="torch", corpus=None
    )
    result = run_bench(settings)
    check_fields(result, settings)
    peer = result["peer"]
    assert peer["name"] == "torch" and peer["threads"] == 2 and peer["attention"] == "math"
    assert peer["first_loss_rel_diff"] < 1e-5  # the same weights and batch give the same loss (float32)
    assert len(peer["runs_tokens_per_s"]) == 2
    ratios = [mine / theirs for mine, theirs in zip(result["runs_tokens_per_s"], peer["runs_tokens_per_s"])]
    assert result["ratio"]["runs"] == pytest.approx(ratios)
    assert result["ratio"]["min"] <= result["ratio"]["median"] <= result["ratio"]["max"]


@pytest.mark.gpu
def test_a_tiny_bench_run_on_the_gpu_reports_device_memory():
    settings = BenchSettings(
        preset="tiny", device="cuda", batch_size=2, warmup=1, steps=1, repeats=1, peak_size=256, corpus=None
    )
    result = run_bench(settings)
    assert result["device"] == "cuda" and result["memory"]["traced_step_peak_bytes"] is None
    ledger = memory_ledger(TINY, 2, lora_config=settings.lora_config)
    assert result["peak_device_bytes"] >= ledger.weights + ledger.activations  # the pool's high-water mark
    assert np.isfinite(result["loss_first"]) and result["mfu"] > 0
    json.dumps(result)


@pytest.mark.gpu
def test_the_torch_peer_runs_on_the_gpu_with_the_same_first_loss():
    pytest.importorskip("torch")
    settings = BenchSettings(
        preset="tiny",
        device="cuda",
        batch_size=2,
        warmup=1,
        steps=1,
        repeats=1,
        peak_size=256,
        corpus=None,
        peer="torch",
    )
    result = run_bench(settings)
    peer = result["peer"]
    assert peer["tf32"] is False and peer["gpu"]
    assert peer["first_loss_rel_diff"] < 1e-5  # same weights and batch, float32 on both sides
    assert peer["peak_device_bytes"] > 0 and result["ratio"]["median"] > 0


def test_the_peer_under_bf16_autocast_keeps_float32_masters_and_a_loss_near_float32():
    pytest.importorskip("torch")
    model, _, exact = peer_pair(LoraConfig(r=4, target_modules="all-linear", init="random"))
    torch_peer = load_torch_peer()
    mixed = torch_peer.TorchGPT(
        {
            "n_layer": TINY.n_layer,
            "n_head": TINY.n_head,
            "n_embd": TINY.n_embd,
            "vocab_size": TINY.vocab_size,
        },
        {name: value.astype(np.float32) for name, value in model.params.items()},
        model.trainable_names,
        adapted=tuple(model.adapted_modules),
        scaling=exact.scaling,
        autocast="bfloat16",
    )
    idx, targets = batch(TINY, 4, 64, seed=1)
    exact_loss = float(exact.loss_and_grads(idx, targets)[0])
    mixed_loss = float(mixed.step(idx, targets))
    # bf16 keeps 8 bits of mantissa: the loss moves by about 2^-8 relative, not by float32's 1e-7.
    assert 1e-6 < abs(mixed_loss - exact_loss) / exact_loss < 2e-2
    assert all(t.dtype == torch_peer.torch.float32 for t in mixed.trainable)
    with pytest.raises(ValueError, match="autocast"):
        torch_peer.TorchGPT(
            {"n_layer": 1, "n_head": 1, "n_embd": 4, "vocab_size": 8}, {}, (), autocast="int8"
        )


@pytest.mark.gpu
def test_the_gpu_peer_runs_bf16_autocast_sdpa_and_compile():
    pytest.importorskip("torch")
    settings = BenchSettings(
        preset="tiny",
        device="cuda",
        batch_size=2,
        warmup=3,
        steps=1,
        repeats=1,
        peak_size=1024,
        corpus=None,
        peer="torch",
        peer_attention="sdpa",
        peer_autocast="bfloat16",
        peer_compile=True,
    )
    peer = run_bench(settings)["peer"]
    assert peer["autocast"] == "bfloat16" and peer["compile"] is True
    assert peer["autocast_matmul_peak_gflops"] > 0
    assert 0 < peer["first_loss_rel_diff"] < 2e-2  # bf16 products: near, not equal to, minilora's float32
