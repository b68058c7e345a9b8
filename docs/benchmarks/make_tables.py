"""Tables and plots for docs/benchmarks.md from the JSON lines of ``minilora bench``.

    python docs/benchmarks/make_tables.py docs/benchmarks/results.jsonl

Prints Markdown tables (throughput against the PyTorch peer, with the issue's targets checked;
memory against the ledger) and writes docs/benchmarks/memory_ledger.png and throughput.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from minilora.lab.bench import BENCH_BATCH_SIZES, DEFAULT_LORA
from minilora.lab.memory import ledger_table

HERE = Path(__file__).parent
PRESET_ORDER = ("tiny", "small", "medium", "gpt2s")


def blas_setting(result) -> str:
    """'as-is' when either OpenBLAS variable was set, 'unset' when OpenBLAS chose its kernels itself."""
    env = result["openblas_env"]
    return "unset" if all(value is None for value in env.values()) else "as-is"


def kernel(result) -> str:
    return (
        ",".join(
            lib.get("architecture", "?") for lib in result["blas"] if lib.get("internal_api") == "openblas"
        )
        or "?"
    )


def target(result) -> tuple[float | None, float | None]:
    """The issue's minimum ratio and MFU for this preset, mode and BLAS setting (None: no target)."""
    preset, mode, setting = result["preset"], result["mode"], blas_setting(result)
    if mode == "lora" and preset == "medium":
        return (1.0, None) if setting == "as-is" else (1.5, 0.5)
    if mode == "lora" and preset in ("tiny", "small"):
        return 1.5, None
    if mode == "full" and preset == "medium":
        return 1.2, None
    return None, None


def latest(results) -> list[dict]:
    """One result per (BLAS setting, preset, mode): the last in the files, so a rerun replaces a row."""
    by_key = {(blas_setting(r), r["preset"], r["mode"]): r for r in results}
    return list(by_key.values())


def sort_key(result):
    return (blas_setting(result) != "as-is", result["mode"] != "lora", PRESET_ORDER.index(result["preset"]))


def throughput_table(results) -> str:
    lines = [
        (
            "| BLAS env | kernel | preset | mode | minilora tok/s | torch tok/s | ratio, median [min, max] | target | "
            "minilora GFLOP/s | MFU | peak GFLOP/s | torch MFU |"
        ),
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(results, key=sort_key):
        peer, ratio = r.get("peer"), r.get("ratio")
        min_ratio, min_mfu = target(r)
        if ratio and min_ratio is not None:
            ok = ratio["median"] >= min_ratio and (min_mfu is None or r["mfu"] >= min_mfu)
            goal = (
                f"{min_ratio:.1f}x"
                + (f", MFU {min_mfu:.0%}" if min_mfu else "")
                + (" met" if ok else " **missed**")
            )
        else:
            goal = ""
        lines.append(
            f"| {blas_setting(r)} | {kernel(r)} | {r['preset']} | {r['mode']} | {r['tokens_per_s']:,.0f} | "
            + (
                f"{peer['tokens_per_s']:,.0f} | {ratio['median']:.2f} [{ratio['min']:.2f}, {ratio['max']:.2f}] | "
                if peer
                else "| | "
            )
            + f"{goal} | {r['achieved_gflops']:.1f} | {r['mfu']:.0%} | {r['matmul_peak_gflops']:.0f} | "
            + (f"{peer['mfu']:.0%} |" if peer else " |")
        )
    return "\n".join(lines)


def memory_table(results) -> str:
    lines = [
        (
            "| preset | mode | ledger total MB | of which activations MB | traced step / ledger | "
            "peak RSS increase MB | RSS / ledger | torch peak RSS increase MB |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    seen = set()
    for r in sorted(results, key=sort_key):
        if (r["preset"], r["mode"]) in seen:
            continue
        seen.add((r["preset"], r["mode"]))
        m, ledger, peer = r["memory"], r["memory"]["ledger"], r.get("peer") or {}
        traced = f"{m['traced_step_over_ledger']:.3f}" if m.get("traced_step_over_ledger") else ""
        rss, peer_rss = m.get("peak_rss_increase_bytes"), peer.get("peak_rss_increase_bytes")
        rss_mb = "" if rss is None else f"{rss / 1e6:,.1f}"
        rss_ratio = "" if rss is None else f"{rss / ledger['total']:.2f}"
        peer_mb = "" if peer_rss is None else f"{peer_rss / 1e6:,.1f}"
        lines.append(
            f"| {r['preset']} | {r['mode']} | {ledger['total'] / 1e6:,.1f} | {ledger['activations'] / 1e6:,.1f} | "
            f"{traced} | {rss_mb} | {rss_ratio} | {peer_mb} |"
        )
    return "\n".join(lines)


def plot_memory(results, path: Path, note: str = "") -> Path:
    """Stacked bars of the ledger per preset, full and LoRA, with the measured peak RSS increase as dots."""
    rows = ledger_table(BENCH_BATCH_SIZES, DEFAULT_LORA)
    parts = ("weights", "gradients", "optimizer_state", "activations", "workspace")
    colors = ("#4c72b0", "#dd8452", "#c44e52", "#55a868", "#8c8c8c")
    measured = {(r["preset"], r["mode"]): r["memory"].get("peak_rss_increase_bytes") for r in results}
    fig, axes = plt.subplots(1, len(PRESET_ORDER), figsize=(12, 4), dpi=120)
    for ax, preset in zip(axes, PRESET_ORDER):
        preset_rows = [row for row in rows if row["preset"] == preset]
        bottom = [0.0] * len(preset_rows)
        for part, color in zip(parts, colors):
            values = [row[part] / 1e6 for row in preset_rows]
            ax.bar(range(len(preset_rows)), values, bottom=bottom, color=color, label=part.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, values)]
        for i, row in enumerate(preset_rows):
            value = measured.get((preset, row["mode"]))
            if value:
                ax.plot(i, value / 1e6, "kD", label="measured peak RSS increase" if i == 0 else None)
        ax.set_xticks(range(len(preset_rows)), [row["mode"] for row in preset_rows])
        ax.set_title(f"{preset} (B={preset_rows[0]['batch_size']})")
        ax.set_ylabel("MB" if preset == PRESET_ORDER[0] else "")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="upper center", ncol=6, frameon=False)
    if note:
        fig.text(0.99, 0.01, note.strip(" ()"), ha="right", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_throughput(results, path: Path, note: str = "") -> Path:
    """minilora's tokens/s over torch's, median with min-max bars, per configuration and BLAS setting."""
    with_peer = [r for r in sorted(results, key=sort_key) if r.get("ratio")]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    labels = [f"{r['preset']} {r['mode']}\n{blas_setting(r)}: {kernel(r)}" for r in with_peer]
    medians = [r["ratio"]["median"] for r in with_peer]
    lows = [r["ratio"]["median"] - r["ratio"]["min"] for r in with_peer]
    highs = [r["ratio"]["max"] - r["ratio"]["median"] for r in with_peer]
    ax.bar(
        range(len(with_peer)),
        medians,
        yerr=[lows, highs],
        capsize=3,
        color=["#4c72b0" if blas_setting(r) == "as-is" else "#55a868" for r in with_peer],
    )
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_xticks(range(len(with_peer)), labels, fontsize=7)
    ax.set_ylabel("minilora tokens/s / PyTorch eager tokens/s")
    ax.set_title(
        "Training-step throughput against PyTorch eager (same run, same batches)"
        + (f"\n{note.strip(' ()')}" if note else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", help="JSON-lines files written by minilora bench --out")
    parser.add_argument("--plots", default=str(HERE), help="directory for the PNG files")
    parser.add_argument("--note", default="", help="appended to the plot titles, e.g. ' (preliminary)'")
    args = parser.parse_args()
    results = latest(
        [
            result
            for path in args.results
            for line in Path(path).read_text().splitlines()
            if line.strip() and (result := json.loads(line))["device"] == "cpu"
        ]
    )  # GPU: gpu_tables.py
    print(throughput_table(results))
    print()
    print(memory_table(results))
    plots = Path(args.plots)
    print()
    print(plot_memory(results, plots / "memory_ledger.png", args.note))
    if any(r.get("ratio") for r in results):
        print(plot_throughput(results, plots / "throughput.png", args.note))


if __name__ == "__main__":
    main()
