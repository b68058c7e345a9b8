"""Subcommands for task evaluation: evaluate-task (held-out scores beside their baselines) and task-data."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..tasks import ALL, TASKS
from .arg_types import non_negative_int, positive_int
from .base_commands import add_adapter_flags, add_checkpoint_flag, add_device_flag, add_overwrite_flag

TASK_LIST = ", ".join(TASKS)
TRAINING_ITEMS = 1000  # task-data's default: conversations to write, fewer where the split has fewer
DEFAULT_ITEMS = ", ".join(f"{name} {task.default_items}" for name, task in TASKS.items())
HEADER = f"{'task':<14}{'items':>6}{'seed':>6}{'score':>8}{'baseline':>10}  metric; baseline"


def task_name(text: str) -> str:
    """A task's name or ``all``, for argparse; a one-line error naming any other value."""
    if text != ALL and text not in TASKS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a task ({TASK_LIST}, or {ALL})")
    return text


def add_evaluate_task_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate-task",
        help="score a base (and adapter) on held-out items of a task, beside a baseline",
        description="Did the fine-tune work? Score a base model, with an adapter if given, on held-out "
        "items of tasks with checkable answers (items drawn by --seed from a split no training file holds), "
        f"and print one line per task: items, seed, score and a no-model baseline. Tasks: {TASK_LIST}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("names", nargs="*", type=task_name, metavar="TASK", help=f"{TASK_LIST}, or {ALL}")
    parser.add_argument(
        "--task", action="append", type=task_name, default=None, metavar="TASK",
        help="a task to run, as the positional names are (repeat it for several)",
    )  # fmt: skip
    add_checkpoint_flag(parser, "--checkpoint", "--base")
    add_adapter_flags(parser)
    parser.add_argument(
        "--items", type=positive_int, default=None,
        help=f"held-out items per task (default: each task's own, {DEFAULT_ITEMS}; fewer where a task has fewer)",
    )  # fmt: skip
    parser.add_argument("--seed", type=non_negative_int, default=0, help="which items are drawn")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_flag(parser)
    parser.set_defaults(run=run_evaluate_task)


def result_line(result: dict) -> str:
    """One task's row of the table: task, items, seed, score, baseline, then what they count."""
    extra = "".join(f"; {key} {value:.3f}" for key, value in result.items() if key.startswith("accuracy_"))
    return (
        f"{result['task']:<14}{result['items']:>6}{result['seed']:>6}{result['score']:>8.3f}"
        f"{result['baseline']:>10.3f}  {result['metric']}{extra}; baseline: {result['baseline_is']}"
    )


def run_evaluate_task(args) -> None:
    from ..fast.cpu.inference import cpu_inference
    from ..tasks.suite import evaluate_task, task_names
    from .base_commands import load_for_inference

    names = task_names(
        [*args.names, *(args.task or [])]
    )  # before the model loads: no task named fails at once
    base, model, adapters = load_for_inference(args)
    adapter = args.use or (adapters[-1] if adapters else None)
    print(f"evaluating {base.name}" + (f" with adapter {adapter!r}" if adapter else "") + ", held-out items")
    print(HEADER, flush=True)
    with cpu_inference(model):  # on the CPU, training's policy: fast layers, one-threaded BLAS
        for name in names:
            result = evaluate_task(TASKS[name], model, base.tokenizer, args.items, args.seed, not args.quiet)
            print(result_line(result), flush=True)


def add_task_data_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "task-data",
        help="write a task's training split as JSON Lines conversations, for finetune --corpus",
        description="Write conversations drawn from a task's training split (never one of its held-out "
        "items) as JSON Lines, the file `minilora finetune --corpus FILE.jsonl` trains on.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("name", type=task_name, metavar="TASK", help=TASK_LIST)
    parser.add_argument("--out", required=True, help="the file to write, FILE.jsonl")
    parser.add_argument(
        "--items", type=positive_int, default=TRAINING_ITEMS,
        help="conversations to write (fewer where the training split has fewer)",
    )  # fmt: skip
    parser.add_argument("--seed", type=non_negative_int, default=0, help="which conversations are drawn")
    add_overwrite_flag(parser, "a training file that minilora task-data wrote at --out")
    parser.set_defaults(run=run_task_data)


def run_task_data(args) -> None:
    from ..tasks.training_file import write_training_file

    if args.name == ALL:
        raise ValueError(f"task-data writes one task's file: name one of {TASK_LIST}, not {ALL}")
    if Path(args.out).suffix != ".jsonl":
        raise ValueError(f"--out {args.out}: name a .jsonl file, the conversations finetune --corpus reads")
    written = write_training_file(TASKS[args.name], args.out, args.items, args.seed, args.overwrite)
    print(
        f"wrote {written} {args.name} training conversations (seed {args.seed}) to {args.out}; "
        f"train on them with: minilora finetune --corpus {args.out}"
    )


def register(subparsers) -> None:
    add_evaluate_task_parser(subparsers)
    add_task_data_parser(subparsers)
