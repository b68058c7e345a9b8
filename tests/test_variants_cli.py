"""The command line for LoRA variants: finetune --variant / --loraplus-ratio, named adapters, PEFT files."""

import json
import re

import pytest

from minilora.cli import main

SHAPE = ["--preset", "tiny", "--n-layer", "1", "--n-embd", "16", "--block-size", "16"]
TRAINING = ["--batch-size", "4", "--eval-windows", "4", "--warmup-steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert (
        main(
            [
                "pretrain",
                "--corpus",
                "devils_dictionary",
                "--steps",
                "6",
                "--eval-interval",
                "6",
                "--out",
                str(out),
                *SHAPE,
                *TRAINING,
            ]
        )
        == 0
    )
    return out


def finetune(base, out, *flags):
    return main(
        [
            "finetune",
            "--base",
            str(base),
            "--corpus",
            "kjv",
            "--steps",
            "4",
            "--eval-interval",
            "4",
            "--out",
            str(out),
            *TRAINING,
            *flags,
        ]
    )


@pytest.mark.parametrize("variant, key", [("dora", "lora_magnitude_vector"), ("pissa", "lora_A")])
def test_finetune_variants_write_loadable_adapters(base, tmp_path, variant, key, capsys):
    assert finetune(base, tmp_path / variant, "--variant", variant, "--r", "2") == 0
    config = json.loads((tmp_path / variant / "adapter_config.json").read_text())
    assert config["variant"] == ("dora" if variant == "dora" else "lora")
    if variant == "pissa":
        assert (
            config["converted_from"] == "pissa" and config["lora_config"]["r"] == 4
        )  # rank 2r against the base
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(base),
                "--adapter",
                str(tmp_path / variant),
                "--corpus",
                "kjv",
                "--max-windows",
                "4",
            ]
        )
        == 0
    )
    assert "bits/byte" in capsys.readouterr().out


def test_loraplus_ratio_is_recorded_and_changes_training(base, tmp_path):
    assert finetune(base, tmp_path / "plain") == 0
    assert finetune(base, tmp_path / "plus", "--loraplus-ratio", "16") == 0
    plain = json.loads((tmp_path / "plain" / "finetune_metrics.json").read_text())
    plus = json.loads((tmp_path / "plus" / "finetune_metrics.json").read_text())
    assert plus["loraplus_ratio"] == 16.0 and plain["loraplus_ratio"] == 1.0
    assert plus["result"]["losses"][-1]["loss"] != plain["result"]["losses"][-1]["loss"]


def test_eval_reports_every_named_adapter_and_generate_uses_the_chosen_one(base, tmp_path, capsys):
    assert finetune(base, tmp_path / "a") == 0
    assert finetune(base, tmp_path / "b", "--r", "4", "--seed", "1") == 0
    capsys.readouterr()
    adapters = ["--adapter", f"first={tmp_path / 'a'}", "--adapter", f"second={tmp_path / 'b'}"]
    assert main(["eval", "--checkpoint", str(base), *adapters, "--corpus", "kjv", "--max-windows", "4"]) == 0
    out = capsys.readouterr().out
    values = dict(re.findall(r"with adapter '(\w+)': ([\d.]+) bits/byte", out))
    assert set(values) == {"first", "second"} and values["first"] != values["second"]
    assert (
        main(["generate", "--checkpoint", str(base), *adapters, "--use", "second", "--max-new-tokens", "5"])
        == 0
    )
    assert main(["generate", "--checkpoint", str(base), *adapters, "--use", "third"]) == 1
    assert "names no loaded adapter" in capsys.readouterr().err


def test_peft_export_and_import_round_trip_on_the_command_line(base, tmp_path, capsys):
    assert finetune(base, tmp_path / "ours", "--targets", "all-linear", "--variant", "dora") == 0
    assert (
        main(
            [
                "export-peft",
                "--base",
                str(base),
                "--adapter",
                str(tmp_path / "ours"),
                "--out",
                str(tmp_path / "peft"),
            ]
        )
        == 0
    )
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["use_dora"] and peft_config["fan_in_fan_out"]
    assert (
        main(
            [
                "import-peft",
                "--base",
                str(base),
                "--peft",
                str(tmp_path / "peft"),
                "--out",
                str(tmp_path / "back"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    for adapter in ("ours", "back"):
        assert (
            main(
                [
                    "eval",
                    "--checkpoint",
                    str(base),
                    "--adapter",
                    str(tmp_path / adapter),
                    "--corpus",
                    "kjv",
                    "--max-windows",
                    "4",
                ]
            )
            == 0
        )
    first, second = re.findall(r"([\d.]+) bits/byte", capsys.readouterr().out)
    assert first == second
