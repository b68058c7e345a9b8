"""The ``minilora`` command line: one subcommand per job, each a thin layer over the Python API.

demo_command: demo.   base_commands: pretrain, eval, generate, baseline.   lora_commands: finetune, merge, info,
export-peft, import-peft.   experiment_command: experiment.   assignment_command: assignment.   bench_command: bench.
chat_command: chat.
"""

from __future__ import annotations

import argparse
import sys

from ..backend import BackendError
from ..io.adapters import AdapterError
from ..io.checkpoint import CheckpointError
from ..io.data import CorpusError
from ..training.loop import TrainingDiverged
from . import (
    assignment_command,
    base_commands,
    bench_command,
    chat_command,
    demo_command,
    experiment_command,
    lora_commands,
)

EXPECTED_ERRORS = (
    AdapterError,
    BackendError,
    CorpusError,
    CheckpointError,
    TrainingDiverged,
    ValueError,
    KeyError,
    FloatingPointError,
    RuntimeError,
    FileExistsError,
    FileNotFoundError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora", description="LoRA fine-tuning from first principles on NumPy (CPU) or CuPy (GPU)."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo_command.register(subparsers)
    base_commands.register(subparsers)
    lora_commands.register(subparsers)
    experiment_command.register(subparsers)
    assignment_command.register(subparsers)
    bench_command.register(subparsers)
    chat_command.register(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except EXPECTED_ERRORS as err:
        print(f"minilora {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minilora {args.command}: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
