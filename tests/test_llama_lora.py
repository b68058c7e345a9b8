"""LoRA on the Llama model: PEFT's module names, every gradient path against finite differences in
float64, real freezing, merging, and the variants (DoRA, PiSSA)."""

import numpy as np
import pytest

from minilora.backend import count_matmuls
from minilora.gradcheck import check_model
from minilora.llama import Llama, LlamaConfig, init_llama_params
from minilora.lora.config import LoraConfig, select_target_modules
from minilora.lora.model import LoraLlama, add_lora

CONFIG = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=16, ffn_hidden=24, vocab_size=23, block_size=10)


def base(seed=0):
    params = init_llama_params(CONFIG, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for value in params.values():
        value += 0.2 * rng.standard_normal(value.shape)
    return Llama(CONFIG, params)


def batch(seed=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CONFIG.vocab_size, (2, 6)), rng.integers(0, CONFIG.vocab_size, (2, 6))


def test_peft_target_names_pick_the_llama_modules():
    chosen = select_target_modules(LoraConfig(r=2, target_modules=("q_proj", "v_proj")), CONFIG)
    assert sorted(chosen) == [f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in ("q", "v")]
    kv = CONFIG.n_kv_head * CONFIG.head_size
    assert chosen["model.layers.0.self_attn.v_proj"] == (CONFIG.n_embd, kv)
    every = select_target_modules(LoraConfig(r=2, target_modules="all-linear", layers_to_transform=1), CONFIG)
    assert len(every) == 7 and all(name.startswith("model.layers.1.") for name in every)
    with pytest.raises(ValueError, match="match no module"):
        select_target_modules(LoraConfig(r=2, target_modules=("c_attn",)), CONFIG)


@pytest.mark.parametrize(
    "lora_config",
    [
        LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init="random"),
        LoraConfig(
            r=2, lora_alpha=4, target_modules=("q_proj", "down_proj"), init="random", lora_dropout=0.2
        ),
        LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=("k_proj", "up_proj"),
            init="random",
            use_dora=True,
            dora_exact_gradient=True,
        ),  # the detached-norm gradient is not the exact one
        LoraConfig(r=2, lora_alpha=4, target_modules=("o_proj", "gate_proj"), init="pissa"),
    ],
    ids=["all-linear", "dropout", "dora", "pissa"],
)
def test_every_adapter_gradient_matches_finite_differences(lora_config):
    model = add_lora(base(), lora_config, seed=5)
    assert isinstance(model, LoraLlama) and model.trainable_names
    check_model(model, *batch(), mode="elementwise", dropout_seed=7).assert_ok(1e-6)


def test_the_frozen_base_gets_no_weight_gradient_product():
    model = add_lora(base(), LoraConfig(r=2, target_modules="all-linear", init="random"), seed=5)
    _, _, cache = model.forward(*batch())
    with count_matmuls() as log:
        grads = model.backward(cache)
    assert set(grads) == set(model.trainable_names)
    C, F, kv = CONFIG.n_embd, CONFIG.ffn_hidden, CONFIG.n_kv_head * CONFIG.head_size
    base_weight_shapes = {(C, C), (C, kv), (C, F), (F, C), (C, CONFIG.vocab_size)}
    assert not [out for _, _, out in log.products if out in base_weight_shapes]


def test_merging_gives_the_adapted_output_and_unloads_a_plain_llama():
    model = add_lora(base(), LoraConfig(r=2, target_modules="all-linear", init="random"), seed=5)
    idx, _ = batch()
    adapted = model.forward(idx)[0]
    merged = model.merge_and_unload()
    assert type(merged) is Llama
    np.testing.assert_allclose(merged.forward(idx)[0], adapted, rtol=1e-10, atol=1e-12)
    model.merge()
    np.testing.assert_allclose(model.forward(idx)[0], adapted, rtol=1e-10, atol=1e-12)
    model.unmerge()
    with model.disable_adapter():
        np.testing.assert_allclose(model.forward(idx)[0], base().forward(idx)[0], rtol=1e-10, atol=1e-12)


def test_an_adapter_file_round_trips_onto_a_fresh_llama(tmp_path):
    from minilora.io.adapters import load_adapter, save_adapter

    model = add_lora(base(), LoraConfig(r=2, target_modules=("q_proj", "v_proj"), init="random"), seed=5)
    idx, _ = batch()
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(base(), tmp_path / "adapter")
    assert isinstance(loaded, LoraLlama)
    np.testing.assert_array_equal(loaded.forward(idx)[0], model.forward(idx)[0])


# PEFT's own files, both ways, on transformers' Llama holding the same weights (float64).


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_loads_a_minilora_llama_adapter_and_gives_the_same_logits(tmp_path, use_dora):
    peft = pytest.importorskip("peft")
    from hf_llama import hf_llama

    from minilora.io.peft import export_peft

    model = add_lora(base(), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init="random",
                                        use_dora=use_dora), seed=5)  # fmt: skip
    torch, hf = hf_llama(base())
    idx, _ = batch()
    export_peft(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(idx)).logits.numpy()
    ours = model.forward(idx)[0]
    assert not np.allclose(ours, base().forward(idx)[0], atol=1e-3)  # the adapter really changes the output
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)  # float64: measured 4e-15


def test_minilora_imports_a_peft_llama_adapter_and_gives_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    from hf_llama import hf_llama

    from minilora.io.peft import import_peft

    torch, hf = hf_llama(base())
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )  # fmt: skip  (False: lora_B random, not zero)
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(str(tmp_path))
    idx, _ = batch()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(idx)).logits.numpy()
    model = import_peft(base(), tmp_path)
    assert isinstance(model, LoraLlama) and len(model.adapted_modules) == 6
    np.testing.assert_allclose(model.forward(idx)[0], theirs, rtol=0, atol=1e-12)  # float64: measured 2e-15
