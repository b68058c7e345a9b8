"""``minilora demo``: the main job, on the shipped base model and corpora."""

from __future__ import annotations

import argparse

from .arg_types import non_negative_int, positive_int
from .base_commands import add_device_flag


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="LoRA-fine-tune the shipped Shakespeare model on First Folio spelling, and measure it",
        description="Load the shipped base (modern-spelling Shakespeare), measure it on the held-out Folio "
        "plays, LoRA-fine-tune it on the Folio training plays, and report what was learned and "
        "forgotten, the parameter table, the adapter's size, samples before and after with their "
        "Folio spellings, the merge check and generation timings. Writes results.json, "
        "loss_curve.png and the adapter to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", default="runs/demo", help="output directory, the demo's own: a second run replaces its files"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="LoRA training steps (default: the demo's)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in seconds (4 steps of 2 sequences, short samples): checks an install, learns little",
    )
    add_device_flag(parser)
    parser.set_defaults(run=run_demo_command)


def run_demo_command(args) -> None:
    from dataclasses import replace

    from ..io.data import SHIPPED_BASE, corpus_files
    from ..io.run_folder import refuse_output_over_inputs
    from ..lab.demo import QUICK_DEMO, DemoSettings, run_demo

    corpora = [*corpus_files("shakespeare_modern"), *corpus_files("shakespeare_folio")]
    refuse_output_over_inputs(
        args.out, [("demo's base", SHIPPED_BASE), *(("demo's corpus", f) for f in corpora)]
    )
    settings = replace(QUICK_DEMO if args.quick else DemoSettings(), seed=args.seed)
    if args.steps is not None:
        settings = replace(settings, steps=args.steps)
    run_demo(args.out, args.device, settings)


def register(subparsers) -> None:
    add_demo_parser(subparsers)
