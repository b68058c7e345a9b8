"""QLoRA on the GPU: the fused dequantization kernels give the reference dequantizers' values bit
for bit (Q4_1, Q8_0, NF4; slabs and table lookups), a quantized linear on CuPy equals the dense one,
and an accelerated QLoRA step (fused kernels, CUDA graph) follows the reference step's losses.
These tests run only where CuPy and a GPU are present (they skip elsewhere, e.g. in CPU-only CI).
"""

import numpy as np
import pytest

from minilora.backend import to_device, to_numpy
from minilora.fast import accelerate
from minilora.fast.cuda.kernels.dequantize import FUSED_DEQUANTIZERS, fuse_dequantizers
from minilora.layers.quantized_linear import quantized_linear_backward, quantized_linear_forward
from minilora.llama import EMBED, Llama, LlamaConfig, init_llama_params
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.optim import AdamW
from minilora.quant import quantize_weight as quantize
from minilora.training.step import train_step

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("block_format", sorted(FUSED_DEQUANTIZERS))
def test_the_fused_dequantizer_gives_the_references_bits(block_format):
    rng = np.random.default_rng(0)
    host = (rng.standard_normal((300, 640)) * rng.uniform(1e-3, 4, (300, 1))).astype(np.float32)
    host[5, :64] = 0.0  # a zero block
    weight = quantize(host, block_format).map_arrays(cupy.asarray)  # blocks on the GPU
    fused = fuse_dequantizers_of(weight)
    for rows in (
        cupy.arange(0, 300),
        cupy.arange(17, 211),
        cupy.asarray([299, 0, 5, 5, 42], dtype=cupy.int32),
    ):
        want = weight.dequantize_rows(weight.arrays, rows, weight.cols)  # the reference, run by CuPy
        got = fused.dequantize_rows(fused.arrays, rows, fused.cols)
        assert got.dtype == cupy.float32 and got.shape == want.shape
        assert bool(cupy.all(got.view(cupy.uint32) == want.view(cupy.uint32)))
    ids = cupy.asarray([[3, 1, 4], [1, 5, 9]], dtype=cupy.int32)  # a table lookup with token ids
    assert bool(cupy.all(fused.take_rows(ids) == weight.take_rows(ids)))
    empty = fused.dequantize_rows(fused.arrays, cupy.arange(0), fused.cols)
    assert empty.shape == (0, 640)


def fuse_dequantizers_of(weight):
    class Holder:  # what fuse_dequantizers asks of a model: the dicts of weights it holds
        params = {"w": weight}

        @classmethod
        def weight_dicts(cls):
            return (cls.params,)

    assert fuse_dequantizers(Holder) == 1
    return Holder.params["w"]


@pytest.mark.parametrize("block_format", sorted(FUSED_DEQUANTIZERS))
def test_a_quantized_linear_on_the_gpu_is_the_dense_layer_with_the_dequantized_weight(block_format):
    rng = np.random.default_rng(1)
    weight = fuse_dequantizers_of(quantize(rng.standard_normal((96, 128)).astype(np.float32), block_format))
    weight = weight.map_arrays(cupy.asarray)
    dense = np.asarray(weight).astype(np.float64)  # (C_in, C_out) on the host
    x = rng.standard_normal((2, 5, 128)).astype(np.float32)
    y, cache = quantized_linear_forward(cupy.asarray(x), weight)
    np.testing.assert_allclose(to_numpy(y), x @ dense, rtol=1e-4, atol=1e-4)
    dout = rng.standard_normal((2, 5, 96)).astype(np.float32)
    dx = quantized_linear_backward(cupy.asarray(dout), cache)
    np.testing.assert_allclose(to_numpy(dx), dout @ dense.T, rtol=1e-4, atol=1e-4)


CONFIG = LlamaConfig(
    n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=128, vocab_size=96, block_size=16
)


def qlora_llama(block_format):
    params = init_llama_params(CONFIG, seed=2)
    for name, value in params.items():
        if value.ndim == 2:
            layout = "table" if name == EMBED else "linear"
            stored = value if layout == "table" else np.ascontiguousarray(value.T)
            params[name] = quantize(stored, block_format, layout).map_arrays(cupy.asarray)
        else:
            params[name] = to_device(value, "cuda")
    return add_lora(Llama(CONFIG, params), LoraConfig(r=4, target_modules="all-linear"), seed=3)


@pytest.mark.parametrize("block_format", ["q4_1", "nf4"])
@pytest.mark.parametrize("memory_switches", [False, True], ids=["plain", "checkpointed-chunked"])
def test_an_accelerated_qlora_step_follows_the_reference_step(block_format, memory_switches):
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, CONFIG.vocab_size, (2, 2, 16))] * 5  # one batch again: its loss must fall
    losses = {}
    for fast in (False, True):
        model = qlora_llama(block_format)
        model.gradient_checkpointing = memory_switches
        model.loss_chunk_rows = 12 if memory_switches else None
        optimizer = AdamW(model.params, model.trainable_names, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
        step = accelerate(model, optimizer, 1.0, graph_warmup=2) if fast else train_step
        if fast:
            assert all(model.params[n].dequantize_rows is FUSED_DEQUANTIZERS[block_format]
                       for n in model.params if hasattr(model.params[n], "dequantize_rows"))  # fmt: skip
        losses[fast] = [float(step(model, optimizer, x, y, 1e-2, 1.0, None)) for x, y in batches]
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-5)
    assert losses[True][-1] < losses[True][0]  # the adapter learns on the quantized base
