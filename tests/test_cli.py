"""The minilora command: help texts, a short pretraining run, and clear errors on bad input."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minilora.cli import main
from minilora.io.checkpoint import load_checkpoint

MICRO_FLAGS = [
    "--preset",
    "tiny",
    "--n-layer",
    "1",
    "--n-embd",
    "16",
    "--block-size",
    "16",
    "--batch-size",
    "4",
    "--steps",
    "6",
    "--eval-interval",
    "3",
    "--eval-windows",
    "4",
    "--warmup-steps",
    "2",
    "--quiet",
]


def test_console_script_is_installed_and_lists_the_subcommands():
    beside_python = Path(sys.executable).parent / "minilora"  # the venv's bin/, active or not
    executable = str(beside_python) if beside_python.exists() else shutil.which("minilora")
    assert executable, "the minilora console script is not installed (pip install -e .)"
    help_text = subprocess.run([executable, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("pretrain", "eval", "generate", "baseline"):
        assert command in help_text


@pytest.mark.parametrize("command", ["pretrain", "eval", "generate", "baseline", "chat"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: minilora {command}" in capsys.readouterr().out


def test_pretrain_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--corpus",
        "--preset",
        "--steps",
        "--lr",
        "--seed",
        "--device",
        "--eval-interval",
        "--resume",
    ):
        assert flag in out


def test_pretrain_writes_a_checkpoint_and_reports_bits_per_byte(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["pretrain", "--corpus", "devils_dictionary", "--out", str(out_dir), *MICRO_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "tokens/s" in printed
    checkpoint = load_checkpoint(out_dir / "checkpoint.safetensors")
    assert checkpoint.metadata["step"] == 6
    assert checkpoint.metadata["config"]["n_embd"] == 16
    assert checkpoint.metadata["provenance"]["device"] == "cpu"
    assert (out_dir / "pretrain_results.json").is_file()


def test_resume_continues_to_a_larger_step_count(tmp_path):
    out_dir = str(tmp_path / "run")
    assert main(["pretrain", "--corpus", "devils_dictionary", "--out", out_dir, *MICRO_FLAGS]) == 0
    assert main(["pretrain", "--out", out_dir, "--resume", "--steps", "9", "--quiet"]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").metadata["step"] == 9


def test_missing_corpus_file_is_a_clear_error(tmp_path, capsys):
    code = main(["pretrain", "--corpus", str(tmp_path / "absent.txt"), "--out", str(tmp_path), *MICRO_FLAGS])
    assert code == 1
    assert "no such file" in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "empty"), "--resume", "--quiet"]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_unknown_device_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--device", "tpu"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run")
    assert main(["pretrain", "--corpus", "devils_dictionary", "--out", str(out_dir), *MICRO_FLAGS]) == 0
    return out_dir


def test_eval_reports_bits_per_byte_matching_the_python_api(trained_run, capsys):
    from minilora.io.checkpoint import load_model
    from minilora.io.data import load_corpus
    from minilora.training.evaluate import bits_per_byte

    assert main(["eval", "--checkpoint", str(trained_run), "--corpus", "devils_dictionary"]) == 0
    printed = capsys.readouterr().out
    expected = bits_per_byte(load_model(trained_run), load_corpus("devils_dictionary").val)
    assert f"devils_dictionary val: {expected:.4f} bits/byte" in printed


def test_generate_continues_the_prompt_reproducibly(trained_run, capsys):
    args = ["generate", "--checkpoint", str(trained_run), "--prompt", "WAR, n.", "--max-new-tokens", "40"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("WAR, n.") and len(first.encode()) >= len("WAR, n.") + 40


def test_baseline_reports_the_ngram_bits_per_byte(capsys):
    assert main(["baseline", "--corpus", "devils_dictionary", "--order", "3"]) == 0
    assert "bits/byte (byte 3-gram, Witten-Bell)" in capsys.readouterr().out


def test_checkpoint_with_a_misshaped_parameter_names_it(trained_run, tmp_path, capsys):
    from minilora.io.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = load_checkpoint(trained_run / "checkpoint.safetensors")
    checkpoint.params["transformer.h.0.mlp.c_fc.weight"] = checkpoint.params[
        "transformer.h.0.mlp.c_fc.weight"
    ].T
    broken = tmp_path / "broken.safetensors"
    save_checkpoint(broken, checkpoint.params, checkpoint.metadata)
    assert main(["eval", "--checkpoint", str(broken), "--corpus", "devils_dictionary"]) == 1
    err = capsys.readouterr().err
    assert "'transformer.h.0.mlp.c_fc.weight' has shape (64, 16), the model expects (16, 64)" in err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint at all")
    assert main(["generate", "--checkpoint", str(corrupt)]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err
