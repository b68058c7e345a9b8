"""The experiments' protocol at a budget small enough to run live, and the committed runs read back.

experiments.py measures LoRA on a real budget (200 steps of 16 x 256 bytes a run, on a GPU) and
commits every run to docs/experiments/runs.jsonl. This module runs the same protocol, at a budget of
a few seconds a run, on a base model already in memory, so that a notebook can show it on two CPU
cores:

- phase 1, the sweep: every point (a method and its settings) at every learning rate of its grid,
  with seed 0;
- phase 2, the seeds: the best rate of the sweep (lowest target bits/byte, ``experiments.best_lr``)
  again with the other seeds. A seed sets the adapter's initial weights and the batch order.

The rows it returns carry the fields of runs.jsonl, so ``experiments.summarize_point`` reads live and
committed runs alike: mean, min and max over the seeds at the best rate. ``seed_gap`` states how
far apart two such points are against their seeds' spread. What it leaves out: worker processes
(runs.jsonl's runs are parallel, these run one after another) and writing results to disk.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ..fast import fast_ops
from ..io.data import CHECKOUT_DATA_DIR
from ..jobs.finetune import fit
from ..lora.model import add_lora
from ..model import GPT
from ..training.evaluate import bits_per_byte
from ..training.loop import TrainSettings
from .experiments import RunSpec, best_lr, experiment_points, load_results, summarize_point

REPOSITORY = CHECKOUT_DATA_DIR.parent  # runs.jsonl records each base relative to the repository


def measure(model, corpus, batch_size: int, eval_windows: int) -> float:
    """Bits per byte of ``model`` on ``corpus``'s validation split, with the CPU's fast layer functions.

    The model's weights are shared, not copied, and the model itself is left as it was.
    """
    fast = GPT(model.config, model.params)  # the same arrays; only this view computes fast
    fast.ops = fast_ops(np)
    return bits_per_byte(fast, corpus.val, batch_size=batch_size, max_windows=eval_windows)


def run_live(spec: RunSpec, base: GPT, target, modern, before: dict, warmup_steps: int) -> dict:
    """Train one run of ``spec`` from ``base`` (a GPT in memory, left unchanged) and measure it.

    target, modern: Corpora (the fine-tuning target and the held-out modern plays); before: the base's
    bits/byte on them, {"target": ..., "modern": ...}, measured once for every run. Returns the
    spec's fields with runs.jsonl's measurements, plus the training losses.
    """
    started = time.perf_counter()
    if spec.method == "lora":
        model = add_lora(
            base, spec.lora_config(), seed=spec.seed
        )  # shares the frozen weights; the base stays intact
    else:
        model = GPT(base.config, {name: value.copy() for name, value in base.params.items()})  # full: a copy
    settings = TrainSettings(
        steps=spec.steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        min_lr=spec.lr / 10,
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        eval_interval=spec.steps,
        eval_windows=spec.eval_windows,
        seed=spec.seed,
        log_interval=1,
    )
    result = fit(model, target, settings, progress=False)  # evaluates the target once, at the end
    return {
        **asdict(spec),
        "device": "cpu",
        "target_before": before["target"],
        "target_after": result.evals[-1]["val_bits_per_byte"],
        "modern_before": before["modern"],
        "modern_after": bits_per_byte(model, modern.val, spec.batch_size, spec.eval_windows),
        "trainable_params": model.num_parameters(trainable_only=True),
        "tokens_per_second": result.tokens_per_second,
        "seconds": time.perf_counter() - started,
        "losses": [entry["loss"] for entry in result.losses],  # nats per byte, one per step
    }


def run_protocol(points: list[RunSpec], lrs: dict, seeds: tuple, run) -> list[dict]:
    """Both phases for ``points``: seed 0 at every rate of ``lrs[point.method]``, then ``seeds[1:]``
    at the best of them. ``run(spec)`` trains one run and returns its row (``run_live``, bound)."""
    rows = [run(replace(point, lr=lr, seed=seeds[0])) for point in points for lr in lrs[point.method]]
    rows += [
        run(replace(point, lr=best_lr(rows, point), seed=seed)) for point in points for seed in seeds[1:]
    ]
    return rows


def committed_summaries(name: str, runs_path) -> list[dict]:
    """Every point of experiment ``name`` summarized from a committed runs.jsonl (no training).

    A row names its base relative to the repository; it is resolved here, so that the rows match the
    points of ``experiments.experiment_points``, which name the shipped base by its full path.
    """
    rows = []
    for row in load_results(Path(runs_path)):
        if "error" not in row:
            base = Path(row["base"])
            rows.append({**row, "base": str(base if base.is_absolute() else REPOSITORY / base)})
    weak = next((row["base"] for row in rows if row["label"] == "weak base"), None)
    return [summarize_point(rows, point) for point in experiment_points(name, weak)]


def seed_gap(worse: dict, better: dict, measure: str = "target_after") -> tuple[float, float]:
    """(gap, spread) of two summaries: the difference of their means in ``measure`` (worse - better)
    and the larger of their two seed spreads (max - min). The gap is beyond the seeds when gap > spread."""
    gap = worse[measure]["mean"] - better[measure]["mean"]
    spread = max(point[measure]["max"] - point[measure]["min"] for point in (worse, better))
    return gap, spread
