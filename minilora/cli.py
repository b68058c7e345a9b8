"""The ``minilora`` command line: one subcommand per job, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .backend import DEVICE_ENV_VAR, DEVICES, BackendError
from .checkpoint import CheckpointError
from .config import PRESETS, get_preset
from .data import SHIPPED_CORPORA, CorpusError
from .train import TrainingDiverged, TrainSettings

MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help=f"cpu (NumPy) or cuda (CuPy); default: ${DEVICE_ENV_VAR}, else cpu")


def add_pretrain_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="train a base model from scratch on a corpus",
        description="Pretrain a GPT-2-style base model on a corpus, with periodic validation in bits per "
                    "byte and an atomic checkpoint in --out after every evaluation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--corpus", default="shakespeare_modern",
                        help=f"a shipped corpus ({', '.join(SHIPPED_CORPORA)}) or the path of a UTF-8 text file")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size")
    model = parser.add_argument_group("model shape (each replaces the preset's value)")
    for name in MODEL_FLAGS:
        kind = float if name == "dropout" else int
        model.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    training = parser.add_argument_group("training")
    defaults = TrainSettings()
    for f in fields(TrainSettings):
        training.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None,
                              help=f"(default {getattr(defaults, f.name)})")
    parser.add_argument("--out", default="runs/pretrain", help="directory for the checkpoint and results")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out; training flags given here override its settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_flag(parser)
    parser.set_defaults(run=run_pretrain)


def run_pretrain(args) -> None:
    from .pretrain import pretrain

    given = {f.name: getattr(args, f.name) for f in fields(TrainSettings) if getattr(args, f.name) is not None}
    config = get_preset(args.preset, **{k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None})
    settings = TrainSettings(**given)
    if not args.resume:
        print(f"pretraining {args.preset} {config.to_dict()} on {args.corpus} for {settings.steps} steps")
    model, result = pretrain(args.corpus, config, settings, args.out, device=args.device, resume=args.resume,
                             settings_overrides=given if args.resume else None, progress=not args.quiet)
    final = result.evals[-1]["val_bits_per_byte"] if result.evals else float("nan")
    print(f"done: {model.num_parameters():,} parameters, val {final:.4f} bits/byte, "
          f"{result.tokens_per_second:,.0f} tokens/s, {result.wall_seconds:.1f} s; checkpoint in {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora", description="LoRA fine-tuning from first principles on NumPy (CPU) or CuPy (GPU).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    add_pretrain_parser(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (BackendError, CorpusError, CheckpointError, TrainingDiverged, ValueError, KeyError) as err:
        print(f"minilora {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minilora {args.command}: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
