"""The ``minilora`` command line: one subcommand per job, each a thin layer over the Python API.

This file builds the parser from each command module's ``register`` and runs the chosen subcommand;
an error a user can cause ends as one line on stderr and exit code 1, a missing extra's module too
(the line names the extra to install, EXTRA_OF_MODULE). The command line sits above
the reference and the fast path, and nothing in the library imports it.

Reading order:

    arg_types.py           argparse types that refuse a bad value in one line, before anything runs
    demo_command.py        demo
    base_commands.py       pretrain, eval, generate, baseline, and the flags they share
    prompt_text.py         a prompt from the command line, a file or stdin; generated text made safe to print
    lora_commands.py       finetune (LoRA or full), merge, info, export-peft, import-peft
    chat_command.py        chat, with SmolLM2-135M-Instruct
    bench_command.py       bench: time training steps, print one JSON line
    experiment_command.py  experiment: the measurements behind docs/experiments
    task_commands.py       evaluate-task (held-out task scores beside baselines), task-data (a task's training file)
    assignment_command.py  assignment: release, grade, verify, export
    __main__.py            ``python -m minilora.cli``, the same as the ``minilora`` script
"""

from __future__ import annotations

import argparse
import os
import sys

from ..backend import BackendError
from ..fast.distributed.world import abort_on_error, current_world
from ..io.adapters import AdapterError
from ..io.checkpoint import CheckpointError
from ..io.data import CorpusError
from ..training.loop import TrainingDiverged
from ..version import __version__
from . import (
    assignment_command,
    base_commands,
    bench_command,
    chat_command,
    demo_command,
    experiment_command,
    lora_commands,
    task_commands,
)
from .arg_types import OneLineErrorParser

# The modules each of minilora's extras brings (pyproject.toml), for the one line that names a missing one.
EXTRA_OF_MODULE = {
    "gguf": "llm",
    "regex": "llm",
    "cupy": "cuda12",
    "ml_dtypes": "cuda12",
    "nbformat": "notebooks",
    "jupytext": "notebooks",
    "nbclient": "notebooks",
    "ipykernel": "notebooks",
    "pytest": "dev",
    "mpi4py": "mpi",
}

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
    OSError,  # a full disk or a read-only folder: atomic writes name the path (io/checkpoint.py)
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="minilora", description="LoRA fine-tuning from first principles on NumPy (CPU) or CuPy (GPU)."
    )
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo_command.register(subparsers)
    base_commands.register(subparsers)
    lora_commands.register(subparsers)
    experiment_command.register(subparsers)
    assignment_command.register(subparsers)
    bench_command.register(subparsers)
    chat_command.register(subparsers)
    task_commands.register(subparsers)
    return parser


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help, unless X is None or False or the help already names its default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def subcommand_parsers(parser: argparse.ArgumentParser):
    """Every parser below ``parser`` (subcommands, and their own subcommands), depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield child
                yield from subcommand_parsers(child)


def chosen_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The deepest subcommand's parser that ``args`` went through (``minilora assignment release``'s)."""
    for action in parser._actions:
        if (
            isinstance(action, argparse._SubParsersAction)
            and getattr(args, action.dest, None) in action.choices
        ):
            return chosen_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def parse_arguments(argv=None) -> argparse.Namespace:
    """The parsed command line; an unknown option is reported by the subcommand it was given to."""
    parser = build_parser()
    for child in subcommand_parsers(parser):
        child.formatter_class = DefaultsHelpFormatter
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def missing_module(err: ImportError) -> str | None:
    """The top-level name of the module an import failed to find, through the errors that wrap it."""
    while isinstance(err, ImportError):
        if err.name:
            return err.name.partition(".")[0]
        err = err.__cause__
    return None


def out_of_memory_line(err: MemoryError) -> str:
    """One line for an allocation that failed: the size NumPy names, if it named one, and what to lower."""
    said = f" ({err})" if str(err) else ""
    return (
        f"out of memory{said}: lower --batch-size, the model's size (--n-embd, --n-layer) or --max-new-tokens"
    )


def main(argv=None) -> int:
    args = parse_arguments(argv)
    try:
        world = current_world()  # under mpirun every rank runs this command
        if not world.is_writer:  # rank 0 alone speaks; errors still reach stderr
            sys.stdout = open(os.devnull, "w")  # for the rest of this process
        with abort_on_error(world, args.command):  # under mpirun: one rank's failure ends the job
            args.run(args)
    except EXPECTED_ERRORS as err:
        print(f"minilora {args.command}: error: {err}", file=sys.stderr)
        return 1
    except ImportError as err:
        extra = EXTRA_OF_MODULE.get(missing_module(err))
        if extra is None:
            raise
        print(f"minilora {args.command}: error: needs the {extra} extra: pip install 'minilora[{extra}]' "
              f"(no module named {missing_module(err)!r})", file=sys.stderr)  # fmt: skip
        return 1
    except MemoryError as err:  # a size that passed the checks before allocating (jobs/memory_check.py)
        print(f"minilora {args.command}: error: {out_of_memory_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minilora {args.command}: interrupted; checkpoints written before are intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
