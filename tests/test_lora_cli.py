"""The LoRA commands end to end: finetune (LoRA and --full), merge, info, and --adapter for eval and generate."""

import contextlib
import io
import json
import math
import re

import numpy as np
import pytest
from safetensors import safe_open

from minilora.cli import main
from minilora.io.checkpoint import load_model

PRETRAIN_FLAGS = [
    "--corpus",
    "devils_dictionary",
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
FINETUNE_FLAGS = [
    "--corpus",
    "shakespeare_folio",
    "--steps",
    "4",
    "--eval-interval",
    "2",
    "--eval-windows",
    "4",
    "--batch-size",
    "4",
    "--warmup-steps",
    "1",
    "--quiet",
]
C = 16
# The micro base, counted by hand: wte 256x16, wpe 16x16, one block (ln_1 2x16, c_attn 16x48 + 48,
# attn.c_proj 16x16 + 16, ln_2 2x16, mlp.c_fc 16x64 + 64, mlp.c_proj 64x16 + 16), ln_f 2x16.
BASE_PARAMS = (
    256 * C
    + 16 * C
    + (2 * C + C * 3 * C + 3 * C + C * C + C + 2 * C + C * 4 * C + 4 * C + 4 * C * C + C)
    + 2 * C
)
R = 2
C_ATTN_ADAPTER = R * (C + 3 * C) * 1  # r (C_in + C_out) per adapted matrix, one block


def run(argv):
    """main(argv) with its stdout captured: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def printed_bits_per_byte(text: str) -> float:
    match = re.search(r": (\d+\.\d{4}) bits/byte", text)
    assert match, f"no bits/byte figure in {text!r}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert run(["pretrain", *PRETRAIN_FLAGS, "--out", str(out)])[0] == 0
    return out


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory):
    """Same config as base_dir, other seed: other weights."""
    out = tmp_path_factory.mktemp("other_base")
    assert run(["pretrain", *PRETRAIN_FLAGS, "--seed", "1", "--out", str(out)])[0] == 0
    return out


@pytest.fixture(scope="module")
def adapter(base_dir, tmp_path_factory):
    """(adapter directory, what finetune printed) for a c_attn adapter of rank R."""
    out = tmp_path_factory.mktemp("adapter")
    code, printed = run(
        ["finetune", "--base", str(base_dir), *FINETUNE_FLAGS, "--r", str(R), "--out", str(out)]
    )
    assert code == 0
    return out, printed


def test_base_micro_model_has_the_hand_counted_size(base_dir):
    assert BASE_PARAMS == 7_664
    assert load_model(base_dir).num_parameters() == BASE_PARAMS


@pytest.mark.parametrize("command", ["finetune", "merge", "info"])
def test_every_lora_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: minilora {command}" in capsys.readouterr().out


def test_finetune_writes_the_adapter_its_config_and_metrics(adapter, base_dir):
    out, _ = adapter
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter.previous.safetensors",  # the adapter of the evaluation before the last
        "adapter.safetensors",
        "adapter_config.json",
        "finetune_metrics.json",
        "finetune_state.json",  # what --resume continues from: the adapter and its optimiser state
        "finetune_state.previous.json",
        "finetune_state.previous.safetensors",
        "finetune_state.safetensors",
    ]
    metrics = json.loads((out / "finetune_metrics.json").read_text())
    for key in (
        "mode",
        "corpus",
        "base_fingerprint",
        "lora_config",
        "trainable_params",
        "all_params",
        "summary",
        "val_bits_per_byte_before",
        "val_bits_per_byte_after",
        "saved",
        "saved_bytes",
        "base_weights_bytes",
    ):
        assert key in metrics, key
    assert metrics["mode"] == "lora" and metrics["corpus"] == "shakespeare_folio"
    assert metrics["trainable_params"] == C_ATTN_ADAPTER == 128
    assert metrics["all_params"] == BASE_PARAMS + C_ATTN_ADAPTER
    assert math.isfinite(metrics["val_bits_per_byte_after"]) and math.isfinite(
        metrics["val_bits_per_byte_before"]
    )
    assert metrics["base_weights_bytes"] == 4 * BASE_PARAMS  # float32
    assert (
        metrics["saved_bytes"] == (out / "adapter.safetensors").stat().st_size < metrics["base_weights_bytes"]
    )
    assert metrics["lora_config"]["r"] == R and metrics["lora_config"]["target_modules"] == ["c_attn"]
    with safe_open(str(out / "adapter.safetensors"), framework="numpy") as f:
        shapes = {key: tuple(f.get_tensor(key).shape) for key in f.keys()}
    assert shapes == {
        "transformer.h.0.attn.c_attn.lora_A": (R, C),
        "transformer.h.0.attn.c_attn.lora_B": (3 * C, R),
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_fingerprint"] == metrics["base_fingerprint"]


def test_finetune_prints_the_peft_summary_line(adapter):
    _, printed = adapter
    total = BASE_PARAMS + C_ATTN_ADAPTER
    share = 100 * C_ATTN_ADAPTER / total
    expected = f"trainable params: {C_ATTN_ADAPTER:,} || all params: {total:,} || trainable%: {share:.4f}"
    assert expected == "trainable params: 128 || all params: 7,792 || trainable%: 1.6427"
    assert expected in printed.splitlines()
    assert "shakespeare_folio val:" in printed and "bits/byte" in printed


def test_full_finetune_writes_a_checkpoint_and_trains_every_parameter(base_dir, tmp_path):
    code, printed = run(
        ["finetune", "--base", str(base_dir), *FINETUNE_FLAGS, "--full", "--out", str(tmp_path)]
    )
    assert code == 0
    assert (
        f"trainable params: {BASE_PARAMS:,} || all params: {BASE_PARAMS:,} || trainable%: 100.0000" in printed
    )
    assert not (tmp_path / "adapter.safetensors").exists()
    metrics = json.loads((tmp_path / "finetune_metrics.json").read_text())
    assert metrics["mode"] == "full" and metrics["trainable_params"] == metrics["all_params"] == BASE_PARAMS
    base, tuned = load_model(base_dir), load_model(tmp_path / "checkpoint.safetensors")
    unchanged = [name for name in base.params if np.array_equal(base.params[name], tuned.params[name])]
    assert unchanged == []


def test_finetune_all_linear_with_lora_only_biases(base_dir, tmp_path):
    code, printed = run(
        [
            "finetune",
            "--base",
            str(base_dir),
            *FINETUNE_FLAGS,
            "--targets",
            "all-linear",
            "--r",
            "2",
            "--bias",
            "lora_only",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    lora = R * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))  # the four linear weights of the block
    biases = 3 * C + C + 4 * C + C  # their biases: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    metrics = json.loads((tmp_path / "finetune_metrics.json").read_text())
    assert metrics["trainable_params"] == lora + biases == 656
    assert f"trainable params: 656 || all params: {BASE_PARAMS + lora:,}" in printed
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
    modules = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert keys == {f"transformer.h.0.{m}.{t}" for m in modules for t in ("lora_A", "lora_B", "bias")}

    merged_path = tmp_path / "merged.safetensors"  # the trained biases go into the merged model
    assert (
        run(["merge", "--base", str(base_dir), "--adapter", str(tmp_path), "--out", str(merged_path)])[0] == 0
    )
    merged, base = load_model(merged_path), load_model(base_dir)
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="numpy") as f:
        for m in modules:
            bias = f.get_tensor(f"transformer.h.0.{m}.bias")
            np.testing.assert_array_equal(merged.params[f"transformer.h.0.{m}.bias"], bias)
            assert not np.array_equal(bias, base.params[f"transformer.h.0.{m}.bias"]), m


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--r", "0"], "LoRA rank r must be a positive integer, got 0"),
        (["--r", "1000"], r"rank r=1000 is larger than min(C_in, C_out) = 16 of transformer.h.0.attn.c_attn"),
        (
            ["--targets", "q_proj"],
            "match no module; the modules that can be adapted are block 0 x {attn.c_attn, attn.c_proj, "
            "mlp.c_fc, mlp.c_proj} (a name matches by suffix), or all-linear",
        ),
        (["--layers", "3"], "layers_to_transform [3] out of range"),
        (["--alpha", "0"], "LoraConfig.lora_alpha must be in (0, inf), got 0.0"),
    ],
)
def test_bad_lora_settings_exit_1_with_a_clear_message(flags, message, base_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["finetune", "--base", str(base_dir), *FINETUNE_FLAGS, *flags, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minilora finetune: error: ")
    assert message in err
    assert not (out / "adapter.safetensors").exists()


def test_merged_checkpoint_evaluates_like_the_adapter_and_has_the_base_size(adapter, base_dir, tmp_path):
    adapter_dir, _ = adapter
    merged_path = tmp_path / "merged.safetensors"
    code, printed = run(
        ["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(merged_path)]
    )
    assert code == 0
    assert f"merged 1 adapted weights into {merged_path} ({BASE_PARAMS:,} parameters, as the base)" in printed

    eval_flags = ["--corpus", "shakespeare_folio", "--max-windows", "64"]
    code, with_adapter = run(
        ["eval", "--checkpoint", str(base_dir), "--adapter", str(adapter_dir), *eval_flags]
    )
    assert code == 0
    code, merged_eval = run(["eval", "--checkpoint", str(merged_path), *eval_flags])
    assert code == 0
    # The two differ only by float32 rounding, so the 4-decimal figures differ by one rounding step at most.
    assert abs(printed_bits_per_byte(with_adapter) - printed_bits_per_byte(merged_eval)) <= 1e-4 + 1e-9

    base, merged = load_model(base_dir), load_model(merged_path)
    assert merged.num_parameters() == base.num_parameters() == BASE_PARAMS
    with safe_open(str(adapter_dir / "adapter.safetensors"), framework="numpy") as f:
        lora_A = f.get_tensor("transformer.h.0.attn.c_attn.lora_A").astype(np.float64)  # (r, C_in)
        lora_B = f.get_tensor("transformer.h.0.attn.c_attn.lora_B").astype(np.float64)  # (C_out, r)
    assert np.any(lora_B)
    W = "transformer.h.0.attn.c_attn.weight"
    expected = base.params[W].astype(np.float64) + (16.0 / R) * (lora_B @ lora_A).T  # W + (alpha / r) A^T B^T
    np.testing.assert_allclose(merged.params[W], expected, rtol=0, atol=1e-6)
    assert not np.array_equal(merged.params[W], base.params[W])
    for name in base.params:
        if name != W:
            np.testing.assert_array_equal(merged.params[name], base.params[name], err_msg=name)


def test_info_on_an_adapter_prints_the_summary_and_module_table(adapter):
    adapter_dir, _ = adapter
    code, printed = run(["info", str(adapter_dir)])
    assert code == 0
    assert "trainable params: 128 || all params: 7,792 || trainable%: 1.6427" in printed.splitlines()
    rows = [line.split() for line in printed.splitlines()]
    assert ["transformer.h.0.attn.c_attn", "16", "x", "48", str(R), "128"] in rows
    assert ["total", "128"] in rows
    assert "r=2 lora_alpha=16.0 scaling=8" in printed
    assert "base fingerprint: sha256:" in printed


def test_info_on_a_checkpoint_prints_its_config_and_total(base_dir):
    code, printed = run(["info", str(base_dir)])
    assert code == 0
    assert "'n_layer': 1" in printed and "'n_embd': 16" in printed and "'block_size': 16" in printed
    assert ["total", "7,664"] in [line.split() for line in printed.splitlines()]
    assert ["transformer.h.0.attn.c_attn", "16", "x", "48", f"{16 * 48 + 48:,}"] in [
        line.split() for line in printed.splitlines()
    ]


def test_generate_with_an_adapter_continues_the_prompt_reproducibly(adapter, base_dir):
    adapter_dir, _ = adapter
    argv = [
        "generate",
        "--checkpoint",
        str(base_dir),
        "--adapter",
        str(adapter_dir),
        "--prompt",
        "KING.\\n",
        "--max-new-tokens",
        "30",
    ]
    code, first = run(argv)
    assert code == 0
    assert first.startswith("KING.\n") and len(first.encode()) >= len("KING.\n") + 30
    assert run(argv) == (0, first)


def test_eval_with_an_adapter_on_another_base_is_refused_unless_allowed(adapter, other_base_dir, capsys):
    adapter_dir, _ = adapter
    argv = [
        "eval",
        "--checkpoint",
        str(other_base_dir),
        "--adapter",
        str(adapter_dir),
        "--corpus",
        "shakespeare_folio",
        "--max-windows",
        "8",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("minilora eval: error: ")
    assert "trained on another base (fingerprint" in err and "--allow-base-mismatch" in err
    code, printed = run([*argv, "--allow-base-mismatch"])
    assert code == 0
    assert math.isfinite(printed_bits_per_byte(printed))


def test_merge_onto_another_base_is_refused_and_writes_nothing(adapter, other_base_dir, tmp_path, capsys):
    adapter_dir, _ = adapter
    out = tmp_path / "merged.safetensors"
    assert (
        main(["merge", "--base", str(other_base_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 1
    )
    assert "fingerprint" in capsys.readouterr().err
    assert not out.exists()
