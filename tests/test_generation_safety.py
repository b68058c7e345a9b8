"""Generation on bad numbers and odd shapes: NaN never becomes text, the temperature is checked and
really divides, a one-position model generates, a long prompt keeps its end, the cached path applies
every adapter, and the command line reads prompts from files and prints control bytes escaped."""

import io
import sys
import warnings

import numpy as np
import pytest

from minilora.cli import main
from minilora.cli.prompt_text import printable, read_prompt
from minilora.config import GPTConfig
from minilora.generate import KVCache, generate, generate_ids, sample_next
from minilora.io.checkpoint import save_checkpoint
from minilora.llama import Llama, LlamaConfig, init_llama_params
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=256)
LLAMA = LlamaConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=8, ffn_hidden=12, vocab_size=19, block_size=9)


def perturbed(params: dict, seed: int = 1, size: float = 0.3) -> dict:
    rng = np.random.default_rng(seed)
    for value in params.values():
        value += size * rng.standard_normal(value.shape)  # a peaked, non-degenerate distribution
    return params


def gpt(config=CONFIG, dtype=np.float64) -> GPT:
    return GPT(config, perturbed(init_params(config, seed=0, dtype=dtype)))


def naive_greedy(model, prompt, n):
    """Greedy decoding by rerunning the full forward on the kept context: the definition, no cache."""
    block, keep = model.config.block_size, max(1, model.config.block_size // 2)
    tokens, start = list(prompt), max(0, len(prompt) - block)
    for _ in range(n):
        if len(tokens) - start > block:  # context full: keep the most recent half
            start = len(tokens) - keep
        logits, _, _ = model.forward(np.array([tokens[start:]]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


# NaN in, an error out (never NUL bytes).


def test_a_nan_weight_raises_instead_of_generating_nul_bytes():
    model = gpt()
    model.params["transformer.ln_f.weight"][3] = np.nan
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        generate(model, "ab", max_new_tokens=5, temperature=0)


def test_an_overflowing_lora_scale_raises_instead_of_generating_nul_bytes():
    model = add_lora(gpt(), LoraConfig(r=2, lora_alpha=1e308, init="random"))  # s h lora_B^T overflows
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="NaN or infinite"):
        generate(model, "ab", max_new_tokens=5, temperature=0.8)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0, -1e-320])
def test_a_temperature_that_is_not_finite_and_non_negative_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        generate(gpt(), "ab", max_new_tokens=2, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(np.zeros((1, 4)), np.random.default_rng(0), temperature, None)


@pytest.mark.parametrize("temperature", [1e-320, 1e-300])
def test_a_temperature_whose_division_overflows_falls_back_to_greedy(temperature):
    model = gpt()
    greedy = generate_ids(model, np.array([[5, 6, 7]]), max_new_tokens=15, temperature=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warning escapes either
        tiny = generate_ids(model, np.array([[5, 6, 7]]), max_new_tokens=15, temperature=temperature)
    np.testing.assert_array_equal(tiny, greedy)


def test_zero_temperature_is_greedy():
    logits = np.random.default_rng(0).standard_normal((50, 9))
    np.testing.assert_array_equal(sample_next(logits, np.random.default_rng(1), 0.0, None), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_draws_from_the_softmax_of_the_logits_divided_by_the_temperature(temperature):
    log_probs = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    expected = np.exp(log_probs / temperature) / np.exp(log_probs / temperature).sum()
    # T = 0.5: [0.033, 0.133, 0.3, 0.533]; T = 2: [0.16, 0.226, 0.277, 0.32]; T = 1 would be [0.1, ..., 0.4]
    samples = sample_next(np.tile(log_probs, (40000, 1)), np.random.default_rng(1), temperature, None)
    np.testing.assert_allclose(np.bincount(samples, minlength=4) / 40000, expected, atol=0.01)


# Shapes: a one-position model, a prompt longer than the block, one id buffer.


def test_a_block_size_one_model_generates_from_its_last_token_alone():
    model = gpt(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=1, vocab_size=256))
    ids = generate_ids(model, np.array([[65, 66]]), max_new_tokens=6, temperature=0)
    assert ids.shape == (1, 8)
    assert ids.tolist() == [naive_greedy(model, [65, 66], 6)]


def test_a_prompt_longer_than_the_block_keeps_its_last_tokens():
    model = gpt()
    prompt = np.random.default_rng(4).integers(0, 256, 2 * CONFIG.block_size + 3).tolist()
    ids = generate_ids(model, np.array([prompt]), max_new_tokens=8, temperature=0)
    assert ids[0, : len(prompt)].tolist() == prompt  # the whole prompt comes back
    assert ids.tolist() == [naive_greedy(model, prompt, 8)]
    shifted = [(t + 1) % 256 for t in prompt[: -CONFIG.block_size]] + prompt[-CONFIG.block_size :]
    tail_only = generate_ids(model, np.array([shifted]), max_new_tokens=8, temperature=0)
    assert tail_only[0, len(prompt) :].tolist() == ids[0, len(prompt) :].tolist()  # the head is never read


def test_the_id_buffer_is_allocated_once_not_grown_per_token(monkeypatch):
    calls = []
    concatenate = np.concatenate

    def counting_concatenate(*args, **kwargs):
        calls.append(1)
        return concatenate(*args, **kwargs)

    model = gpt()
    counts = []
    for n in (3, 30):  # 30 tokens crosses the block twice
        calls.clear()
        monkeypatch.setattr(np, "concatenate", counting_concatenate)
        ids = generate_ids(model, np.array([[1, 2]]), max_new_tokens=n, temperature=1.0)
        monkeypatch.undo()
        assert ids.shape == (1, 2 + n)
        counts.append(len(calls))
    assert counts[0] == counts[1], f"concatenate calls grow with the tokens generated: {counts}"


def test_negative_max_new_tokens_is_refused():
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        generate_ids(gpt(), np.array([[1]]), max_new_tokens=-1)


# The cached path runs every adapted module through its adapter.

GPT_MODULES = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("module", GPT_MODULES + LLAMA_MODULES)
def test_the_cached_generation_path_applies_the_adapter_of_every_module(module, use_dora):
    if module in GPT_MODULES:
        base, vocab = gpt(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=9, vocab_size=19)), 19
    else:
        base, vocab = Llama(LLAMA, perturbed(init_llama_params(LLAMA, dtype=np.float64))), LLAMA.vocab_size
    ids = np.random.default_rng(2).integers(0, vocab, (2, 9))
    base_logits = base.forward(ids)[0]
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=(module,), init="random", use_dora=use_dora)
    model = add_lora(base, lora, seed=3)
    if use_dora:  # move the magnitudes off their start, so the magnitude path matters too
        for name in model.trainable_names:
            if name.endswith("lora_magnitude_vector"):
                model.params[name] *= 1.5
    full = model.forward(ids)[0]
    assert np.abs(full - base_logits).max() > 1e-3  # the adapter changes the logits
    cache = KVCache(model, 2)
    prefill = model.forward(ids[:, :4], kv_cache=cache)[0]
    steps = [model.forward(ids[:, t : t + 1], kv_cache=cache)[0] for t in range(4, 9)]
    np.testing.assert_allclose(np.concatenate([prefill, *steps], axis=1), full, rtol=0, atol=1e-12)


# The command line: prompts from files and stdin, escaped control bytes, one-line errors.


@pytest.fixture
def checkpoint(tmp_path):
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=256)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(
        path, perturbed(init_params(config, dtype=np.float32), size=0.02), {"config": config.to_dict()}
    )
    return path


def test_printable_escapes_every_control_character_but_newline_and_tab():
    text = "a\x00b\tc\nd\re\x1b[31mf\x7fg\x85h é"
    assert printable(text) == "a\\x00b\tc\nd\\x0de\\x1b[31mf\\x7fg\\x85h é"


def test_generate_prints_control_bytes_escaped(checkpoint, capsys):
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "a\x01", "--max-new-tokens", "200"]
    assert main([*args, "--temperature", "1.5"]) == 0  # a near-uniform model: many control bytes
    out = capsys.readouterr().out
    assert out.startswith("a\\x01")
    assert out.count("\\x") > 5  # the random model did emit control bytes, shown escaped
    assert not any(ord(c) < 0x20 and c not in "\t\n" or 0x7F <= ord(c) < 0xA0 for c in out)


def test_generate_reads_the_prompt_from_a_file_and_from_stdin(checkpoint, tmp_path, capsys, monkeypatch):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("First line\\n stays\nsecond é", encoding="utf-8")
    common = ["generate", "--checkpoint", str(checkpoint), "--max-new-tokens", "5", "--temperature", "0"]
    assert main([*common, "--prompt", f"@{prompt_file}"]) == 0
    from_file = capsys.readouterr().out
    assert from_file.startswith("First line\\n stays\nsecond é")  # a file's text is taken as it is
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(prompt_file.read_bytes())))
    assert main([*common, "--prompt", "-"]) == 0
    assert capsys.readouterr().out == from_file


def test_a_missing_or_non_utf8_prompt_file_is_one_clear_line(checkpoint, tmp_path, capsys):
    common = ["generate", "--checkpoint", str(checkpoint), "--max-new-tokens", "5"]
    assert main([*common, "--prompt", f"@{tmp_path / 'absent.txt'}"]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "absent.txt" in err and err.count("\n") == 1
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    assert main([*common, "--prompt", f"@{latin1}"]) == 1
    err = capsys.readouterr().err
    assert "latin1.txt" in err and "is not UTF-8 text: byte 0xe9 at offset 3" in err and err.count("\n") == 1


def test_read_prompt_turns_a_typed_backslash_n_into_a_newline_only_inline():
    assert read_prompt("ROMEO:\\n") == "ROMEO:\n"


def test_generate_on_a_nan_checkpoint_or_a_nan_temperature_fails_without_output(checkpoint, tmp_path, capsys):
    from minilora.io.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    loaded.params["transformer.ln_f.bias"][0] = np.nan
    broken = tmp_path / "nan.safetensors"
    save_checkpoint(broken, loaded.params, loaded.metadata)
    assert main(["generate", "--checkpoint", str(broken), "--max-new-tokens", "5"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "NaN or infinite" in captured.err
    for bad in ("nan", "inf", "1e400"):
        code = exit_code(["generate", "--checkpoint", str(checkpoint), "--temperature", bad])
        captured = capsys.readouterr()
        assert code != 0 and captured.out == "" and "temperature" in captured.err


def exit_code(argv) -> int:
    """``main``'s exit code, whether it returns one (an error in the run) or argparse exits (a bad flag)."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code
