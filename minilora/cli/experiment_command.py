"""``minilora experiment``: the measurements behind docs/experiments (see minilora/lab/experiments.py)."""

from __future__ import annotations

import argparse

from .arg_types import positive_int
from .base_commands import add_device_flag


def add_experiment_parser(subparsers) -> None:
    from ..lab.experiments import EXPERIMENTS

    parser = subparsers.add_parser(
        "experiment",
        help="run the LoRA experiments (rank, distance, placement, base) and plot them",
        description="Fine-tune the shipped base many times (a learning-rate sweep per method, then 3 seeds at "
        "the best rate) and write <out>/<name>.json and <name>.png. Runs are appended to "
        "<out>/runs.jsonl and skipped when rerun. Meant for a GPU: --device cuda --workers 8.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "names",
        nargs="+",
        choices=[*EXPERIMENTS, "memory", "all"],
        help="which experiments ('memory' plots the memory ledger; it trains nothing)",
    )
    parser.add_argument("--out", default="docs/experiments", help="output directory")
    parser.add_argument("--workers", type=positive_int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--steps", type=positive_int, default=200, help="fine-tuning steps per run")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--eval-windows", type=positive_int, default=64)
    parser.add_argument("--base", default=None, help="replace the shipped base (for quick checks)")
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="only rebuild the JSON summaries and figures from <out>/runs.jsonl",
    )
    add_device_flag(parser)
    parser.set_defaults(run=run_experiment_command)


def run_experiment_command(args) -> None:
    from ..backend import resolve_device
    from ..io.bases import base_file
    from ..io.run_folder import refuse_output_over_inputs
    from ..lab.experiments import EXPERIMENTS, run_experiment, summarize_only

    refuse_output_over_inputs(args.out, [("--base", base_file(args.base))])
    names = [*EXPERIMENTS, "memory"] if "all" in args.names else args.names
    for name in names:
        print(f"experiment {name}")
        if name == "memory":
            write_memory_ledger(args.out)
            continue
        if args.summarize_only:
            summarize_only(name, args.out, args.steps, args.batch_size, args.eval_windows)
            continue
        run_experiment(
            name,
            args.out,
            resolve_device(args.device),
            args.workers,
            args.steps,
            args.batch_size,
            args.eval_windows,
            base=args.base,
        )


def write_memory_ledger(out_dir) -> None:
    """docs/experiments/memory.json and memory.png: the ledger of the bench presets, full against LoRA."""
    import json
    from pathlib import Path

    from ..lab.bench import BENCH_BATCH_SIZES
    from ..lab.experiment_plots import plot_memory_ledger
    from ..lab.memory import ledger_table
    from ..lora.config import LoraConfig

    Path(out_dir).mkdir(parents=True, exist_ok=True)  # first: a bad path fails before a minute of probing
    rows = ledger_table(BENCH_BATCH_SIZES, LoraConfig(r=8, target_modules=("c_attn", "attn.c_proj")))
    (Path(out_dir) / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_memory_ledger(rows, Path(out_dir) / "memory.png")


def register(subparsers) -> None:
    add_experiment_parser(subparsers)
