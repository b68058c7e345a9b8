"""The shipped base model and the demo that fine-tunes it."""

import json

import numpy as np
import pytest

import minilora as ml
from minilora.io.checkpoint import load_checkpoint
from minilora.io.data import SHIPPED_BASE as BASE_CHECKPOINT
from minilora.lab.demo import DemoSettings, folio_spellings_per_1000, run_demo


@pytest.mark.slow
def test_shipped_base_reproduces_its_recorded_validation_bits_per_byte():
    recorded = load_checkpoint(BASE_CHECKPOINT).metadata["reference_eval"]
    model = ml.load_model(BASE_CHECKPOINT)
    measured = ml.bits_per_byte(model, ml.load_corpus("shakespeare_modern").val, max_windows=128)
    # bit-identical on the machine that recorded it; BLAS differences elsewhere stay far below 1e-3
    assert abs(measured - recorded["bits_per_byte_128_windows"]) < 1e-3
    assert recorded["bits_per_byte"] < 2.2  # the base clearly beats the 4-gram baseline (2.61)


def test_shipped_base_is_small_and_stored_in_float16():
    assert BASE_CHECKPOINT.stat().st_size < 16 * 2**20
    checkpoint = load_checkpoint(BASE_CHECKPOINT)
    assert {value.dtype for value in checkpoint.params.values()} == {np.dtype(np.float16)}
    assert checkpoint.optimizer is None


def test_folio_spelling_counter_counts_whole_words_only():
    text = "I haue a selfe; loue vnto thee. They have selfe-love, and haven't."
    assert folio_spellings_per_1000(text) == pytest.approx(1000 * 5 / len(text))  # haue selfe loue vnto selfe


def test_demo_runs_end_to_end_and_writes_its_results(tmp_path):
    settings = DemoSettings(
        steps=3, batch_size=2, eval_windows=2, samples=1, sample_chars=40, timing_tokens=10
    )
    printed = []
    results = run_demo(tmp_path, "cpu", settings, say=printed.append)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["bits_per_byte_after"] == results["bits_per_byte_after"]
    assert (tmp_path / "loss_curve.png").stat().st_size > 10_000
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert results["trainable_params"] == 6 * 8 * ((256 + 768) + (256 + 256) + (256 + 1024) + (1024 + 256))
    assert results["merge_max_relative_logit_difference"] < 1e-5
    assert results["adapter_bytes"] < results["base_file_bytes"] / 10
    assert set(results["generation_seconds"]) == {"base", "lora_unmerged", "merged"}
    assert any("trainable params:" in line for line in printed)
