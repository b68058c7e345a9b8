"""Plots as PNG files, drawn with matplotlib's file-only backend (no screen needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_loss_curve(
    losses: list, evals: list, path, title: str, eval_label: str = "validation", others: dict | None = None
) -> Path:
    """Training loss and validation bits/byte against step; ``others`` draws more validation curves.

    losses: [{"step", "loss"}] in nats per byte (converted to bits); evals: [{"step", "val_bits_per_byte"}];
    others: label -> evals of another held-out set (the demo's forgetting on the modern plays).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(
        [e["step"] for e in losses], [e["loss"] / math.log(2) for e in losses], label="training batch", lw=1
    )
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_bits_per_byte"] for e in evals], "o-", label=eval_label)
    for label, other in (others or {}).items():
        ax.plot([e["step"] for e in other], [e["val_bits_per_byte"] for e in other], "s--", label=label)
    return _save(fig, ax, path, "step", "bits per byte", title)


def plot_finetune_runs(runs: dict, path, title: str) -> Path:
    """Validation bits/byte against training tokens for several ``finetune_metrics.json`` documents.

    runs: label -> the metrics dict ``minilora finetune`` writes; the curve starts at the value
    before training (0 tokens). Tokens, not steps, on the x axis: runs with other batches compare.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for label, metrics in runs.items():
        tokens_per_step = metrics["settings"]["batch_size"] * metrics["config"]["block_size"]
        evals = metrics["result"]["evals"]
        xs = [0] + [e["step"] * tokens_per_step for e in evals]
        ys = [metrics["val_bits_per_byte_before"]] + [e["val_bits_per_byte"] for e in evals]
        ax.plot(xs, ys, "o-", label=label)
    return _save(fig, ax, path, "training tokens", "validation bits per byte", title)


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, grid and legend the axes, then write the figure to ``path`` and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
