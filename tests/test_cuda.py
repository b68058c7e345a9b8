"""The CuPy path against the NumPy one: identical starts, and float32 on the GPU close to float64 on the CPU.

These tests run only where CuPy and a GPU are present (they skip elsewhere, e.g. in CPU-only CI).
Following the gradient-check convention, the GPU result in float32 is compared with the NumPy result
in float64, shape and dtype first, then values.
"""

import numpy as np
import pytest

from minilora.backend import device_rng, get_xp, scatter_add, to_device, to_numpy
from minilora.cli import main
from minilora.config import get_preset
from minilora.io.checkpoint import load_checkpoint
from minilora.io.data import load_corpus
from minilora.model import GPT, init_params
from minilora.optim import AdamW
from minilora.training.evaluate import bits_per_byte

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

FLOAT32_TOL = 2e-4  # relative: max|gpu - cpu64| / max|cpu64|


def relative_gap(gpu, reference):
    gpu = to_numpy(gpu).astype(np.float64)
    return float(np.max(np.abs(gpu - reference)) / max(np.max(np.abs(reference)), 1e-12))


def test_init_is_identical_on_cpu_and_gpu():
    config = get_preset("tiny")
    cpu, gpu = init_params(config, seed=5), init_params(config, seed=5, device="cuda")
    for name in cpu:
        assert get_xp(gpu[name]) is cupy
        np.testing.assert_array_equal(to_numpy(gpu[name]), cpu[name])


def test_gpu_float32_forward_and_backward_match_cpu_float64():
    config = get_preset("tiny")
    base = init_params(config, seed=0, dtype=np.float64)
    rng = np.random.default_rng(1)
    for value in base.values():
        value += 0.05 * rng.standard_normal(value.shape)
    cpu = GPT(config, base)
    gpu = GPT(config, {name: to_device(value.astype(np.float32), "cuda") for name, value in base.items()})
    idx, targets = rng.integers(0, 256, (4, 64)), rng.integers(0, 256, (4, 64))
    logits64, loss64, cache64 = cpu.forward(idx, targets)
    logits32, loss32, cache32 = gpu.forward(idx, targets)
    assert logits32.shape == logits64.shape and logits32.dtype == np.float32
    assert relative_gap(logits32, logits64) < FLOAT32_TOL
    assert abs(float(loss32) - float(loss64)) < 1e-4
    grads64, grads32 = cpu.backward(cache64), gpu.backward(cache32)
    assert set(grads32) == set(grads64)
    for name in grads64:
        assert grads32[name].shape == grads64[name].shape and grads32[name].dtype == np.float32
        assert relative_gap(grads32[name], grads64[name]) < 1e-3, name


def test_dropout_masks_are_drawn_on_the_gpu():
    config = get_preset("tiny", dropout=0.1)
    model = GPT(config, init_params(config, device="cuda"))
    idx = np.zeros((2, 8), dtype=np.int64)
    _, _, cache = model.forward(idx, idx, dropout_rng=device_rng(cupy, 0, 1, 2))
    assert get_xp(cache.embedding_dropout) is cupy


def test_scatter_add_on_the_gpu_adds_repeated_indices():
    target = cupy.zeros((3, 2), dtype=cupy.float32)
    scatter_add(target, cupy.asarray([2, 2, 0]), cupy.ones((3, 2), dtype=cupy.float32))
    np.testing.assert_array_equal(to_numpy(target), [[1, 1], [0, 0], [2, 2]])


def test_out_of_range_token_ids_are_caught_on_the_host_before_the_gpu():
    config = get_preset("tiny")
    model = GPT(config, init_params(config, device="cuda"))
    with pytest.raises(ValueError, match="token id 300"):
        model.forward(np.full((1, 4), 300))


def test_adamw_on_the_gpu_matches_the_cpu():
    params_cpu = {"w": np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)}
    params_gpu = {"w": to_device(params_cpu["w"], "cuda")}
    opt_cpu, opt_gpu = AdamW(params_cpu, ["w"], lr=1e-2), AdamW(params_gpu, ["w"], lr=1e-2)
    for step in range(5):
        grad = np.random.default_rng(step).standard_normal((8, 8)).astype(np.float32)
        opt_cpu.step({"w": grad})
        opt_gpu.step({"w": to_device(grad, "cuda")})
    np.testing.assert_allclose(to_numpy(params_gpu["w"]), params_cpu["w"], rtol=1e-5, atol=1e-6)


def test_gpu_pretraining_checkpoint_evaluates_the_same_on_the_cpu(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--device",
                "cuda",
                "--preset",
                "tiny",
                "--steps",
                "30",
                "--eval-interval",
                "30",
                "--corpus",
                "devils_dictionary",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    checkpoint = load_checkpoint(out / "checkpoint.safetensors")
    config = get_preset("tiny")
    val = load_corpus("devils_dictionary").val
    on_cpu = bits_per_byte(GPT(config, checkpoint.params), val, max_windows=64)
    on_gpu = bits_per_byte(
        GPT(config, {k: to_device(v, "cuda") for k, v in checkpoint.params.items()}), val, max_windows=64
    )
    assert checkpoint.metadata["provenance"]["device"] == "cuda"
    assert abs(on_cpu - checkpoint.metadata["val_bits_per_byte"]) < 1e-4
    assert abs(on_cpu - on_gpu) < 1e-4


@pytest.mark.parametrize("variant", ["lora", "dora", "pissa"])
def test_gpu_lora_variants_match_cpu_float64(variant):
    from minilora.lora.config import LoraConfig
    from minilora.lora.model import add_lora

    config = get_preset("tiny")
    base = init_params(config, seed=0, dtype=np.float64)
    lora_config = LoraConfig(
        r=4,
        target_modules="all-linear",
        init="pissa" if variant == "pissa" else "random",
        use_dora=variant == "dora",
    )
    cpu = add_lora(GPT(config, base), lora_config, seed=1)
    gpu = add_lora(
        GPT(config, {k: to_device(v.astype(np.float32), "cuda") for k, v in base.items()}),
        lora_config,
        seed=1,
    )
    idx = np.random.default_rng(2).integers(0, 256, (2, 32))
    logits64, _, cache64 = cpu.forward(idx, idx)
    logits32, _, cache32 = gpu.forward(idx, idx)
    assert relative_gap(logits32, logits64) < FLOAT32_TOL
    grads64, grads32 = cpu.backward(cache64), gpu.backward(cache32)
    assert set(grads32) == set(grads64) == set(cpu.trainable_names)
    for name in grads64:
        assert relative_gap(grads32[name], grads64[name]) < 1e-3, name


def test_gpu_float32_llama_forward_and_backward_match_cpu_float64():
    from minilora.llama import Llama, LlamaConfig, init_llama_params

    config = LlamaConfig(
        n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48, vocab_size=64, block_size=16
    )
    base = init_llama_params(config, seed=0, dtype=np.float64)
    rng = np.random.default_rng(2)
    for value in base.values():
        value += 0.05 * rng.standard_normal(value.shape)
    cpu = Llama(config, base)
    gpu = Llama(config, {name: to_device(value.astype(np.float32), "cuda") for name, value in base.items()})
    idx, targets = rng.integers(0, 64, (3, 16)), rng.integers(0, 64, (3, 16))
    logits64, loss64, cache64 = cpu.forward(idx, targets)
    logits32, loss32, cache32 = gpu.forward(idx, targets)
    assert logits32.dtype == np.float32 and relative_gap(logits32, logits64) < FLOAT32_TOL
    assert abs(float(loss32) - float(loss64)) < 1e-4
    grads64, grads32 = cpu.backward(cache64), gpu.backward(cache32)
    assert set(grads32) == set(grads64)
    for name in grads64:
        assert grads32[name].dtype == np.float32 and relative_gap(grads32[name], grads64[name]) < 1e-3, name
