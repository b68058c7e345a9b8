"""The protocol at a live budget (lab/small_sweep.py): the sweep, the seeds, the committed runs read back."""

import json
from pathlib import Path

import numpy as np
import pytest

from minilora import GPT, GPTConfig, bits_per_byte, init_params, load_corpus
from minilora.lab.experiments import RunSpec, summarize_point
from minilora.lab.small_sweep import committed_summaries, measure, run_live, run_protocol, seed_gap

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "experiments"


@pytest.mark.parametrize("name", ["rank", "placement"])
def test_committed_summaries_match_the_committed_summary_files(name):
    committed = json.loads((EXPERIMENTS_DIR / f"{name}.json").read_text())["points"]
    summaries = committed_summaries(name, EXPERIMENTS_DIR / "runs.jsonl")
    assert [s["label"] for s in summaries] == [p["label"] for p in committed]
    for summary, point in zip(summaries, committed):
        assert summary["best_lr"] == point["best_lr"] and summary["seeds"] == point["seeds"]
        for measure_name in ("target_after", "modern_after"):
            assert summary[measure_name] == pytest.approx(point[measure_name], abs=1e-12)


def test_the_sweep_picks_each_point_a_rate_from_seed_zero_and_reruns_it_with_the_other_seeds():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    base = GPT(config, init_params(config))
    weights = {name: value.copy() for name, value in base.params.items()}
    target, modern = load_corpus("devils_dictionary"), load_corpus("shakespeare_modern")
    before = {"target": measure(base, target, 2, 2), "modern": measure(base, modern, 2, 2)}
    common = {"steps": 3, "batch_size": 2, "eval_windows": 2, "targets": ("attn.c_attn",)}
    points = [
        RunSpec("live", "r=2", "devils_dictionary", "lora", lr=0.0, seed=0, r=2, lora_alpha=4.0, **common),
        RunSpec("live", "full", "devils_dictionary", "full", lr=0.0, seed=0, **common),
    ]
    lrs = {"lora": (1e-3, 1e-2), "full": (1e-4, 1e-3)}
    rows = run_protocol(points, lrs, (0, 1), lambda spec: run_live(spec, base, target, modern, before, 1))
    assert [(row["label"], row["lr"], row["seed"]) for row in rows[:4]] == [
        ("r=2", 1e-3, 0),
        ("r=2", 1e-2, 0),
        ("full", 1e-4, 0),
        ("full", 1e-3, 0),
    ]
    for point in points:
        sweep = [row for row in rows[:4] if row["label"] == point.label]
        best = min(sweep, key=lambda row: row["target_after"])["lr"]
        rerun = [row for row in rows[4:] if row["label"] == point.label]
        assert [(row["lr"], row["seed"]) for row in rerun] == [(best, 1)]
        summary = summarize_point(rows, point)
        assert summary["seeds"] == [0, 1] and summary["best_lr"] == best
    assert all(len(row["losses"]) == 3 and np.isfinite(row["modern_after"]) for row in rows)
    assert rows[0]["trainable_params"] == 2 * (16 + 48)
    assert all(np.array_equal(base.params[name], weights[name]) for name in weights)  # the base is untouched
    assert rows[0]["target_before"] == before["target"]


def test_measure_is_the_reference_score_and_leaves_the_model_as_it_was():
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    model = GPT(config, init_params(config, dtype=np.float64))
    corpus = load_corpus("devils_dictionary")
    ops = model.ops
    assert measure(model, corpus, 2, 4) == pytest.approx(bits_per_byte(model, corpus.val, 2, 4), rel=1e-10)
    assert model.ops is ops


def test_a_gap_is_measured_against_the_larger_seed_spread():
    def point(values):
        return {"target_after": {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}}

    gap, spread = seed_gap(point([2.2, 2.3]), point([2.0, 2.02]))
    assert gap == pytest.approx(0.24) and spread == pytest.approx(0.1)
    gap, spread = seed_gap(point([2.05, 2.3]), point([2.0, 2.1]))
    assert gap < spread  # overlapping seeds: not beyond the spread
