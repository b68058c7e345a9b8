"""One figure per experiment (see experiments.py): means over seeds with their min-max spread."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _errorbar(ax, xs, points, measure="target_after", **style):
    means = [p[measure]["mean"] for p in points]
    low = [p[measure]["mean"] - p[measure]["min"] for p in points]
    high = [p[measure]["max"] - p[measure]["mean"] for p in points]
    ax.errorbar(xs, means, yerr=[low, high], capsize=3, **style)


def _full_band(ax, full, measure="target_after", label="full fine-tuning"):
    value = full[measure]
    ax.axhline(value["mean"], color="black", ls="--", lw=1, label=label)
    ax.axhspan(value["min"], value["max"], color="black", alpha=0.08)


def plot_rank(points, ax_learned, ax_forgot):
    lora = [p for p in points if p["method"] == "lora"]
    full = next(p for p in points if p["method"] == "full")
    ranks = [p["r"] for p in lora]
    _errorbar(ax_learned, ranks, lora, marker="o", label="LoRA (all linear layers)")
    _full_band(ax_learned, full)
    for p in lora:
        ax_learned.annotate(
            f"{p['trainable_params'] / 1e3:.0f}k",
            (p["r"], p["target_after"]["mean"]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=7,
        )
    ax_learned.set_title("Folio after fine-tuning (labels: trainable params)")
    _errorbar(ax_forgot, ranks, lora, measure="modern_after", marker="o", label="LoRA")
    _full_band(ax_forgot, full, measure="modern_after")
    ax_forgot.axhline(lora[0]["modern_before"], color="grey", ls=":", label="base")
    ax_forgot.set_title("modern plays after (forgetting)")
    for ax in (ax_learned, ax_forgot):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")


def plot_distance(points, ax_learned, ax_forgot):
    corpora = sorted(
        {p["corpus"] for p in points},
        key=lambda c: next(p["target_before"] for p in points if p["corpus"] == c),
    )
    pairs = [
        (
            next(p for p in points if p["corpus"] == c and p["method"] == "lora"),
            next(p for p in points if p["corpus"] == c and p["method"] == "full"),
        )
        for c in corpora
    ]
    xs = [lora["target_before"] for lora, _ in pairs]
    gaps = [lora["target_after"]["mean"] - full["target_after"]["mean"] for lora, full in pairs]
    spread = [
        [
            gap - (lora["target_after"]["min"] - full["target_after"]["max"])
            for gap, (lora, full) in zip(gaps, pairs)
        ],
        [
            (lora["target_after"]["max"] - full["target_after"]["min"]) - gap
            for gap, (lora, full) in zip(gaps, pairs)
        ],
    ]
    ax_learned.errorbar(xs, gaps, yerr=spread, marker="o", capsize=3, label="LoRA r=8 minus full fine-tuning")
    for x, gap, corpus in zip(xs, gaps, corpora):
        ax_learned.annotate(
            corpus, (x, gap), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7
        )
    ax_learned.set_xlabel("distance: the base's bits/byte on the target")
    ax_learned.set_title("gap on the target after fine-tuning")
    for offset, index, label in ((-0.2, 0, "LoRA r=8"), (0.2, 1, "full fine-tuning")):
        ax_forgot.bar(
            [i + offset for i in range(len(pairs))],
            [pair[index]["forgetting"] for pair in pairs],
            width=0.4,
            label=label,
        )
    ax_forgot.set_xticks(range(len(corpora)), corpora, fontsize=8)
    ax_forgot.set_title("forgetting: modern plays, after - before")


def plot_placement(points, ax_learned, ax_forgot):
    placed = [p for p in points if not p["label"].startswith(("alpha/r", "rslora"))]
    ax_learned.bar(
        range(len(placed)),
        [p["target_after"]["mean"] for p in placed],
        yerr=[
            [p["target_after"]["mean"] - p["target_after"]["min"] for p in placed],
            [p["target_after"]["max"] - p["target_after"]["mean"] for p in placed],
        ],
        capsize=3,
    )
    ax_learned.set_xticks(
        range(len(placed)), [f"{p['label']}\n{p['trainable_params'] / 1e3:.0f}k" for p in placed], fontsize=7
    )
    low = min(p["target_after"]["min"] for p in placed)
    ax_learned.set_ylim(low - 0.05, max(p["target_after"]["max"] for p in placed) + 0.05)
    ax_learned.set_title("Folio after, ~98k trainable parameters")
    for kind, marker in (("alpha/r", "o"), ("rslora", "s")):
        chosen = [p for p in points if p["label"].startswith(kind)]
        _errorbar(
            ax_forgot,
            [p["r"] for p in chosen],
            chosen,
            marker=marker,
            label="alpha/r: s = 16/r" if kind == "alpha/r" else "rsLoRA: s = 16/sqrt(r)",
        )
    ax_forgot.set_xscale("log", base=2)
    ranks = sorted({p["r"] for p in points if p["label"].startswith("rslora")})
    ax_forgot.set_xticks(ranks, [str(r) for r in ranks])
    ax_forgot.set_xlabel("rank r (c_attn only)")
    ax_forgot.set_title("scaling at large ranks: Folio after")


def plot_base(points, ax_learned, ax_forgot):
    labels = [p["label"] for p in points]
    ax_learned.bar(
        [i - 0.2 for i in range(len(points))], [p["target_before"] for p in points], width=0.4, label="before"
    )
    ax_learned.bar(
        [i + 0.2 for i in range(len(points))],
        [p["target_after"]["mean"] for p in points],
        width=0.4,
        label="after LoRA r=8",
    )
    ax_learned.set_xticks(range(len(points)), labels)
    ax_learned.set_title("Folio, before and after")
    ax_forgot.bar(range(len(points)), [p["forgetting"] for p in points])
    ax_forgot.set_xticks(range(len(points)), labels)
    ax_forgot.set_title("forgetting of the modern plays")


PLOTS = {"rank": plot_rank, "distance": plot_distance, "placement": plot_placement, "base": plot_base}


def plot_experiment(name: str, points: list[dict], path) -> Path:
    fig, (ax_learned, ax_forgot) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    PLOTS[name](points, ax_learned, ax_forgot)
    for ax in (ax_learned, ax_forgot):
        ax.set_ylabel("bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"experiment: {name} (mean of 3 seeds, bars: min-max)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


LEDGER_LINES = ("weights", "gradients", "optimizer_state", "activations", "workspace")


def plot_memory_ledger(rows: list[dict], path) -> Path:
    """Stacked bars of the memory ledger (memory.ledger_table) per preset, full against LoRA."""
    presets = list(dict.fromkeys(row["preset"] for row in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(3 * len(presets), 4), dpi=120)
    for ax, preset in zip(axes, presets):
        pair = [
            next(r for r in rows if r["preset"] == preset and r["mode"] == mode) for mode in ("full", "lora")
        ]
        bottom = [0.0, 0.0]
        for line in LEDGER_LINES:
            heights = [row[line] / 2**20 for row in pair]
            ax.bar(["full", "LoRA"], heights, bottom=bottom, label=line.replace("_", " "))
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(f"{preset} (batch {pair[0]['batch_size']})")
        ax.set_ylabel("MiB")
    axes[0].legend(fontsize=7)
    fig.suptitle("memory of one training step (LoRA r=8 on c_attn and attn.c_proj)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
