"""The experiment protocol: sweep, best learning rate, seeds, summaries and figures (no real training budget)."""

import numpy as np
import pytest

from minilora.lab.experiment_plots import plot_experiment
from minilora.lab.experiments import (
    EXPERIMENTS,
    RunSpec,
    best_lr,
    experiment_points,
    run_one,
    summarize_point,
    sweep,
)


def fake_rows(point, results):
    """results: {(lr, seed): target_after}."""
    return [
        {
            **point.__dict__,
            "lr": lr,
            "seed": seed,
            "target_after": value,
            "modern_after": 2.0 + value / 10,
            "target_before": 3.0,
            "modern_before": 2.1,
            "trainable_params": 1000,
        }
        for (lr, seed), value in results.items()
    ]


def test_every_experiment_sweeps_three_rates_per_point():
    for name in EXPERIMENTS:
        points = experiment_points(name, weak_base="weak.safetensors")
        runs = sweep(points)
        assert len(runs) == 3 * len(points)
        assert all(run.seed == 0 for run in runs)
        assert {run.lr for run in runs if run.method == "full"} <= {1e-4, 3e-4, 1e-3}


def test_alpha_is_twice_the_rank_so_the_scale_is_constant():
    for point in experiment_points("rank"):
        if point.method == "lora":
            assert point.lora_alpha == 2 * point.r


def test_best_rate_comes_from_seed_zero_and_the_summary_spans_the_seeds():
    point = RunSpec("rank", "r=8", "shakespeare_folio", "lora", lr=0.0, seed=0, r=8)
    rows = fake_rows(
        point,
        {(1e-3, 0): 2.5, (3e-3, 0): 2.3, (1e-2, 0): 2.4, (3e-3, 1): 2.2, (3e-3, 2): 2.6, (1e-2, 1): 1.0},
    )  # a better number at another rate and seed must not be chosen
    assert best_lr(rows, point) == 3e-3
    summary = summarize_point(rows, point)
    assert summary["seeds"] == [0, 1, 2]
    assert summary["target_after"] == {"mean": pytest.approx(2.3667, abs=1e-4), "min": 2.2, "max": 2.6}
    assert summary["forgetting"] == pytest.approx(2.0 + 2.3667 / 10 - 2.1, abs=1e-4)


def test_one_run_trains_and_measures_both_held_out_sets(tmp_path):
    from minilora.config import GPTConfig
    from minilora.io.checkpoint import save_checkpoint
    from minilora.model import init_params

    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    save_checkpoint(tmp_path / "base.safetensors", init_params(config), {"config": config.to_dict()})
    spec = RunSpec(
        "rank",
        "r=2",
        "devils_dictionary",
        "lora",
        lr=1e-2,
        seed=0,
        r=2,
        lora_alpha=4.0,
        base=str(tmp_path / "base.safetensors"),
        steps=3,
        batch_size=2,
        eval_windows=2,
    )
    row = run_one(spec, "cpu")
    assert row["trainable_params"] == 2 * (16 + 48)
    assert np.isfinite(row["target_after"]) and np.isfinite(row["modern_after"])
    assert row["modern_before"] == pytest.approx(row["modern_after"], abs=0.5)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_experiment_figure_draws_from_summaries(tmp_path, name):
    points = []
    for point in experiment_points(name, weak_base="weak.safetensors"):
        rows = fake_rows(point, {(lr, seed): 2.0 + 0.01 * seed for lr in (1e-3, 1e-4) for seed in (0, 1, 2)})
        points.append(summarize_point(rows, point))
    path = plot_experiment(name, points, tmp_path / f"{name}.png")
    assert path.stat().st_size > 10_000
