"""The GPU table and plot of docs/gpu.md from the JSON lines of ``minilora bench --device cuda``.

    python docs/benchmarks/gpu_tables.py docs/benchmarks/gpu.jsonl

Prints one Markdown row per line of the file (every run is kept: the file holds variants of one
configuration on purpose) and writes docs/benchmarks/gpu_step_times.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent


def label(r) -> str:
    parts = [r["preset"], r["mode"], "graph" if r["cuda_graph"] else "eager"]
    if r["gpu"]["tf32"]:
        parts.append("TF32")
    return " ".join(parts)


def ms(stats) -> str:
    return f"{1e3 * stats['median']:.2f} [{1e3 * stats['min']:.2f}, {1e3 * stats['max']:.2f}]"


def gpu_table(results) -> str:
    lines = [
        "| run | attention (gpt2s) | minilora ms, median [min, max] | MFU | minilora peak GB | "
        "torch attention | torch ms, median | torch peak GB | ratio, median [min, max] |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        peer, ratio = r.get("peer") or {}, r.get("ratio")
        lines.append(
            f"| {label(r)} | {r.get('attention_variant', '')} | {ms(r['step_time_s'])} | {r['mfu']:.0%} | "
            f"{r['peak_device_bytes'] / 1e9:.2f} | {peer.get('attention', '')} | "
            + (
                f"{1e3 * peer['step_time_s']['median']:.2f} | {peer['peak_device_bytes'] / 1e9:.2f} | "
                f"{ratio['median']:.2f} [{ratio['min']:.2f}, {ratio['max']:.2f}] |"
                if peer
                else "| | |"
            )
        )
    return "\n".join(lines)


def plot_step_times(results, path: Path) -> Path:
    """Step time of minilora and of the PyTorch peer, per run, for the float32 (non-TF32) runs."""
    runs = [r for r in results if r.get("peer") and not r["gpu"]["tf32"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, preset in zip(axes, ("medium", "gpt2s")):
        chosen = [r for r in runs if r["preset"] == preset]
        names = [
            f"{r['mode']}\nvs torch {r['peer']['attention']}"
            + ("\n(LSE recompute)" if "log-sum-exp" in r.get("attention_variant", "") else "")
            for r in chosen
        ]
        ours = [1e3 * r["step_time_s"]["median"] for r in chosen]
        theirs = [1e3 * r["peer"]["step_time_s"]["median"] for r in chosen]
        xs = range(len(chosen))
        ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="minilora (CuPy, CUDA graph)", color="#55a868")
        ax.bar([x + 0.2 for x in xs], theirs, width=0.4, label="PyTorch eager", color="#4c72b0")
        ax.set_xticks(list(xs), names, fontsize=7)
        ax.set_ylabel("ms per training step (median)")
        ax.set_title(f"{preset} on one H200, float32")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", help="JSON-lines file written by minilora bench --device cuda --out")
    args = parser.parse_args()
    results = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    print(gpu_table(results))
    print(plot_step_times(results, HERE / "gpu_step_times.png"))


if __name__ == "__main__":
    main()
