"""A merged Llama written as a Hugging Face checkpoint folder loads in transformers with minilora's
logits: from a float32 base, from a base held in NF4 blocks (dequantized plus the adapter), in
float32 and in float16; and the folder is never overwritten without being asked."""

import json

import numpy as np
import pytest

from minilora.io.hf_checkpoint import HF_CONFIG, HF_WEIGHTS, save_hf_llama
from minilora.io.run_folder import RunFolderError
from minilora.llama import EMBED, Llama, LlamaConfig, init_llama_params
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.quant import quantize_nf4

CONFIG = LlamaConfig(
    n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=128, vocab_size=70, block_size=16
)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init="random")


def lora_llama(quantized: bool):
    params = init_llama_params(CONFIG, seed=1)
    rng = np.random.default_rng(2)
    for value in params.values():
        value += (0.1 * rng.standard_normal(value.shape)).astype(np.float32)
    if quantized:  # every matrix in NF4, as a QLoRA base holds it
        for name, value in params.items():
            if value.ndim == 2:
                layout = "table" if name == EMBED else "linear"
                params[name] = quantize_nf4(
                    value if layout == "table" else np.ascontiguousarray(value.T), layout
                )
    model = add_lora(Llama(CONFIG, params), LORA, seed=3)
    for name in model.trainable_names:  # a trained-looking adapter: B away from zero
        model.params[name] += (0.05 * rng.standard_normal(model.params[name].shape)).astype(np.float32)
    return model


def transformers_logits(folder, ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("quantized", [False, True], ids=["float32-base", "nf4-base"])
@pytest.mark.parametrize("dtype, tolerance", [("float32", 2e-5), ("float16", 2e-2)])
def test_a_merged_llama_loads_in_transformers_with_miniloras_logits(tmp_path, quantized, dtype, tolerance):
    model = lora_llama(quantized)
    ids = np.random.default_rng(4).integers(0, CONFIG.vocab_size, (2, 9))
    ours = model.forward(ids)[0]  # the adapter beside its base, unmerged
    save_hf_llama(model.merge_and_unload(), tmp_path, dtype)
    config = json.loads((tmp_path / HF_CONFIG).read_text())
    assert config["torch_dtype"] == dtype and config["num_key_value_heads"] == CONFIG.n_kv_head
    theirs = transformers_logits(tmp_path, ids)
    scale = np.abs(ours).max()
    assert np.abs(theirs - ours).max() <= tolerance * scale
    with model.disable_adapter():  # the adapter moves the logits far more than the export's error
        assert np.abs(model.forward(ids)[0] - ours).max() > 20 * tolerance * scale


def test_the_file_holds_torch_linear_layout_in_the_asked_dtype(tmp_path):
    from safetensors.numpy import load_file

    model = lora_llama(False)
    merged = model.merge_and_unload()
    save_hf_llama(merged, tmp_path, "float16")
    tensors = load_file(tmp_path / HF_WEIGHTS)
    assert set(tensors) == set(merged.params) and all(t.dtype == np.float16 for t in tensors.values())
    k = "model.layers.0.self_attn.k_proj.weight"  # minilora (C, kv) -> torch (kv, C)
    assert tensors[k].shape == (CONFIG.n_kv_head * CONFIG.head_size, CONFIG.n_embd)
    np.testing.assert_array_equal(tensors[k], merged.params[k].T.astype(np.float16))
    np.testing.assert_array_equal(tensors[EMBED], merged.params[EMBED].astype(np.float16))


def test_an_export_refuses_to_overwrite_an_adapter_model_or_an_existing_folder(tmp_path):
    model = lora_llama(False)
    with pytest.raises(ValueError, match="merge_and_unload"):
        save_hf_llama(model, tmp_path)
    merged = model.merge_and_unload()
    save_hf_llama(merged, tmp_path)
    before = (tmp_path / HF_WEIGHTS).read_bytes()
    with pytest.raises(RunFolderError, match="holds the result of an earlier minilora merge.*--overwrite"):
        save_hf_llama(merged, tmp_path, "float16")
    assert (tmp_path / HF_WEIGHTS).read_bytes() == before
    save_hf_llama(merged, tmp_path, "float16", overwrite=True)
    assert (tmp_path / HF_WEIGHTS).read_bytes() != before
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_hf_llama(merged, tmp_path / "other", "bfloat16")
