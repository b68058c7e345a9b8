"""Whatever a PiSSA adapter saves must load: the edge ranks, rsLoRA, minilora's format and PEFT's.

A PiSSA adapter of rank r is saved as the plain LoRA of its change to the base, rank 2r; a plain
LoRA may not have a rank above min(C_in, C_out), so above r = min / 2 that change is written at
rank min (exactly: its rank cannot be larger). Every weight of CONFIG has min(C_in, C_out) = 8.
"""

import numpy as np
import pytest

from minilora.config import GPTConfig
from minilora.io.adapters import load_adapter, save_adapter
from minilora.io.peft import export_peft, import_peft
from minilora.llama import LlamaConfig
from minilora.lora.config import LoraConfig, select_target_modules
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=7)
SIDE = 8  # min(C_in, C_out) of every module of CONFIG


def trained_pissa(r: int, use_rslora: bool = False):
    """A float64 base and a PiSSA adapter of rank r on it, its factors moved as if trained."""
    params = init_params(CONFIG, seed=0, dtype=np.float64)
    rng = np.random.default_rng(1)
    for value in params.values():
        value += 0.2 * rng.standard_normal(value.shape)
    base = GPT(CONFIG, params)
    config = LoraConfig(r=r, lora_alpha=3.0, target_modules="all-linear", init="pissa", use_rslora=use_rslora)
    model = add_lora(base, config)
    for name in model.trainable_names:
        model.params[name] += 0.1 * rng.standard_normal(model.params[name].shape)
    return base, model


def ids():
    return np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 5))


@pytest.mark.parametrize("r", [1, SIDE // 2, SIDE // 2 + 1, SIDE])
def test_pissa_adapter_loads_back_at_every_rank(r, tmp_path):
    base, model = trained_pissa(r)
    trained = model.forward(ids())[0]
    save_adapter(model, tmp_path)
    loaded = load_adapter(base, tmp_path)
    assert loaded.lora_config.r == min(2 * r, SIDE)
    np.testing.assert_allclose(loaded.forward(ids())[0], trained, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("r", [SIDE // 2, SIDE // 2 + 1])
def test_pissa_export_to_peft_imports_back_with_rslora(r, tmp_path):
    # rsLoRA's scale lora_alpha / sqrt(r) must survive the change of rank: read as lora_alpha / r,
    # or written without use_rslora, the logits move.
    base, model = trained_pissa(r, use_rslora=True)
    trained = model.forward(ids())[0]
    export_peft(model, tmp_path / "peft")
    imported = import_peft(base, tmp_path / "peft")
    assert imported.lora_config.use_rslora
    np.testing.assert_allclose(imported.forward(ids())[0], trained, rtol=1e-9, atol=1e-10)
    save_adapter(model, tmp_path / "ours")
    loaded = load_adapter(base, tmp_path / "ours")
    assert loaded.lora_config.use_rslora
    np.testing.assert_allclose(loaded.forward(ids())[0], trained, rtol=1e-9, atol=1e-10)


def test_pissa_refuses_ranks_it_could_not_save_exactly_on_modules_of_different_sizes():
    # A Llama with grouped-query attention: k_proj and v_proj are 16 x 8, q_proj and o_proj 16 x 16.
    llama = LlamaConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, ffn_hidden=32, vocab_size=11)
    select_target_modules(LoraConfig(r=4, target_modules="all-linear", init="pissa"), llama)  # 2r <= 8
    with pytest.raises(ValueError, match=r"PiSSA with r=5 on modules whose smaller sides differ \[8, 16\]"):
        select_target_modules(LoraConfig(r=5, target_modules="all-linear", init="pissa"), llama)
