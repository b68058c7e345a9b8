"""The README's Python API walk-through, end to end on a small base: load, adapt, train, evaluate, merge, save."""

import numpy as np

import minilora as ml


def test_readme_lora_workflow(tmp_path):
    config = ml.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
    pretrain_settings = ml.TrainSettings(steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_windows=8)
    base = ml.GPT(config, ml.init_params(config, seed=0))
    ml.fit(base, ml.load_corpus("shakespeare_modern"), pretrain_settings, progress=False)

    model = ml.add_lora(base, ml.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "attn.c_proj"]))
    adapter_params = (
        2 * 8 * ((32 + 3 * 32) + (32 + 32))
    )  # layers * r * (C_in + C_out), c_attn and attn.c_proj
    assert ml.model_summary_line(model).startswith(f"trainable params: {adapter_params:,} || all params:")
    folio = ml.load_corpus("shakespeare_folio")
    before = ml.bits_per_byte(model, folio.val, max_windows=16)
    settings = ml.TrainSettings(
        steps=40, batch_size=8, lr=5e-3, warmup_steps=5, weight_decay=0.0, eval_windows=16
    )
    ml.fit(model, folio, settings, progress=False)
    after = ml.bits_per_byte(model, folio.val, max_windows=16)
    assert after < before

    ml.save_adapter(model, tmp_path / "folio-adapter")
    reloaded = ml.load_adapter(base, tmp_path / "folio-adapter")
    merged = model.merge_and_unload()
    idx = np.arange(32)[None, :]
    np.testing.assert_allclose(merged.forward(idx)[0], reloaded.forward(idx)[0], rtol=1e-5, atol=1e-5)
    text = ml.generate(merged, "HAMLET.\n", max_new_tokens=50, seed=0)
    assert text.startswith("HAMLET.\n") and len(text.encode()) >= 58
