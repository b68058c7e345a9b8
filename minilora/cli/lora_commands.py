"""Subcommands for adapters: finetune (LoRA or full), merge, info."""

from __future__ import annotations

import argparse
from dataclasses import replace

from ..config import GPTConfig
from ..io.bases import SMOLLM2, base_family
from ..llama import LlamaConfig
from ..lora.config import BIASES, INITS, LoraConfig
from ..training.loop import TrainSettings
from .arg_types import block_indices, positive_float, positive_int, probability
from .base_commands import (
    SMOLLM2_EVAL_BLOCK_SIZE,
    add_checkpoint_flag,
    add_corpus_flag,
    add_device_flag,
    add_memory_flags,
    add_overwrite_flag,
    add_quantized_flag,
    add_resume_flags,
    add_training_flags,
    given_training_flags,
    settings_from_flags,
)

# Fine-tuning runs are short: fewer steps and warmup than pretraining, no weight decay, and a
# learning rate that depends on what is trained (an adapter tolerates a far larger one).
FINETUNE_DEFAULTS = TrainSettings(
    steps=300, lr=2e-3, min_lr=2e-4, warmup_steps=20, weight_decay=0.0, eval_interval=100, eval_windows=64
)
FULL_FINETUNE_LR = 3e-4
EVAL_WINDOWS_NOTE = (
    f"the family's: {GPTConfig.default_eval_windows} for a GPT, {LlamaConfig.default_eval_windows} for "
    "--base smollm2, whose windows cost far more on a CPU"
)
# The flags that describe the adapter: --full refuses any of them given a value other than its default.
LORA_ONLY = ("r", "alpha", "lora_dropout", "targets", "layers", "rslora", "variant", "init", "loraplus_ratio",
             "bias")  # fmt: skip
SMOLLM2_BLOCK_SIZE = SMOLLM2_EVAL_BLOCK_SIZE  # SmolLM2's windows: 256 BPE tokens, ~850 bytes of Shakespeare


def add_finetune_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="LoRA-fine-tune a base model (a checkpoint or smollm2) on a corpus (or --full)",
        description="Fine-tune a base model on a corpus. With LoRA (the default) only the adapter is "
        "trained and saved; --full trains every weight, as the comparison (checkpoints only). Writes "
        "finetune_metrics.json to --out. With --base smollm2 the corpus is encoded with SmolLM2's BPE "
        "tokenizer and --targets takes PEFT's names (q_proj,v_proj,...).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_checkpoint_flag(parser, "--base")
    add_corpus_flag(parser, "shakespeare_folio")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, default=8, help="rank of the update")
    lora.add_argument(
        "--alpha", type=float, default=16.0, help="lora_alpha: the update is scaled by alpha / r"
    )
    lora.add_argument("--lora-dropout", type=probability, default=0.0)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16 (LoRA on --device cuda): the frozen base and activations in bf16, the adapter and "
        "its optimiser state in float32",
    )
    lora.add_argument(
        "--targets",
        default=None,
        help="comma-separated module names matched by suffix (c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj; "
        "for smollm2 q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj), or all-linear (default: "
        f"the family's, {','.join(GPTConfig.default_lora_targets)} for a GPT and "
        f"{','.join(LlamaConfig.default_lora_targets)} for smollm2)",
    )
    lora.add_argument(
        "--layers",
        type=block_indices,
        default=None,
        help="comma-separated block indices to adapt (default: all)",
    )
    lora.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rsLoRA)")
    lora.add_argument(
        "--variant",
        choices=("lora", "dora", "pissa"),
        default="lora",
        help="plain LoRA, DoRA (a trained magnitude per output) or PiSSA (start from the top-r SVD)",
    )
    lora.add_argument(
        "--init",
        choices=[i for i in INITS if i != "pissa"],
        default="default",
        help="initialisation of plain LoRA and DoRA factors",
    )
    lora.add_argument(
        "--loraplus-ratio",
        type=positive_float,
        default=1.0,
        help="LoRA+: train lora_B with this multiple of the learning rate (e.g. 16)",
    )
    lora.add_argument("--bias", choices=BIASES, default="none", help="which biases to train as well")
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"full fine-tuning instead of LoRA, with --lr {FULL_FINETUNE_LR} unless given",
    )
    add_training_flags(parser, FINETUNE_DEFAULTS, {"eval_windows": EVAL_WINDOWS_NOTE})
    parser.add_argument(
        "--block-size", type=positive_int, default=None,
        help=f"tokens per training window of --base smollm2 (default {SMOLLM2_BLOCK_SIZE}); a GPT's is its own",
    )  # fmt: skip
    add_quantized_flag(parser, "QLoRA on --base smollm2: keep its frozen matrices in blocks")
    add_memory_flags(parser)
    chat = parser.add_argument_group("conversations (--corpus *.jsonl or devils_dictionary_chat)")
    chat.add_argument(
        "--train-on-prompt",
        action="store_true",
        help="train on every token, the system and user messages and the template's markers too "
        "(default: the assistant's replies alone)",
    )
    chat.add_argument(
        "--packing",
        action="store_true",
        help="several conversations per row, each attending only to itself (default: one per row, padded)",
    )
    parser.add_argument("--out", default="runs/finetune", help="directory for the adapter and metrics")
    add_resume_flags(parser, "the run in --out (finetune_state.safetensors; its base, corpus and LoRA flags)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_flag(parser)
    parser.set_defaults(
        run=run_finetune, lora_defaults={dest: parser.get_default(dest) for dest in LORA_ONLY}
    )


def lora_config_from_args(args, default_targets: str | None = None) -> LoraConfig | None:
    """The adapter the LoRA flags describe, None under --full; ``default_targets`` where --targets is not given.

    finetune has every flag read here; bench only --r, --alpha, --targets and --full, so there the
    others keep LoraConfig's defaults.
    """
    if args.full:
        return None
    flags, defaults = vars(args), LoraConfig()
    targets = args.targets or default_targets
    variant = flags.get("variant", "lora")
    return LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=flags.get("lora_dropout", defaults.lora_dropout),
        target_modules=targets if targets == "all-linear" else tuple(t.strip() for t in targets.split(",")),
        layers_to_transform=flags.get("layers"),
        use_rslora=flags.get("rslora", defaults.use_rslora),
        init="pissa" if variant == "pissa" else flags.get("init", defaults.init),
        bias=flags.get("bias", defaults.bias),
        use_dora=variant == "dora",
    )


def refuse_lora_flags_under_full(args) -> None:
    """--full trains every weight: a LoRA flag given beside it would be ignored, so it is refused (one line)."""
    if not args.full:
        return
    given = [flag_text(dest, getattr(args, dest)) for dest, default in args.lora_defaults.items()
             if getattr(args, dest) != default]  # fmt: skip
    if given:
        raise ValueError(
            f"--full trains every weight, so {', '.join(given)} (LoRA's) would be ignored: leave out --full "
            "to train an adapter, or leave out the LoRA flags"
        )


def flag_text(dest: str, value) -> str:
    """A flag as it was given: ``--r 4``, ``--layers 0,1``, a bare ``--rslora``."""
    flag = f"--{dest.replace('_', '-')}"
    if value is True:
        return flag
    return f"{flag} {','.join(map(str, value)) if isinstance(value, tuple) else value}"


def run_finetune(args) -> None:
    from ..jobs.finetune import finetune

    refuse_lora_flags_under_full(args)
    given = given_training_flags(args)
    if args.full and "lr" not in given:
        given = {"lr": FULL_FINETUNE_LR, "min_lr": FULL_FINETUNE_LR / 10, **given}
    if "lr" in given and "min_lr" not in given:
        given["min_lr"] = given["lr"] / 10
    family = base_family(args.base)  # its defaults: the modules to adapt, the validation windows
    settings = settings_from_flags(
        replace(FINETUNE_DEFAULTS, eval_windows=family.default_eval_windows), given
    )
    lora_config = lora_config_from_args(args, ",".join(family.default_lora_targets))
    block_size = args.block_size
    if block_size is None and args.base == SMOLLM2:
        block_size = SMOLLM2_BLOCK_SIZE
    model, metrics = finetune(
        args.base,
        args.corpus,
        lora_config,
        settings,
        args.out,
        args.device,
        progress=not args.quiet,
        loraplus_ratio=args.loraplus_ratio,
        block_size=block_size,
        quantized=args.quantized,
        gradient_checkpointing=args.gradient_checkpointing,
        loss_chunk_rows=args.loss_chunk_rows,
        resume=args.resume,
        settings_overrides=given_training_flags(args) if args.resume else None,
        overwrite=args.overwrite,
        dtype=args.dtype,
        train_on_prompt=args.train_on_prompt,
        packing=args.packing,
    )
    print(metrics["summary"])
    before, after = metrics["val_bits_per_byte_before"], metrics["val_bits_per_byte_after"]
    print(
        f"{metrics['corpus']} val: {before:.4f} -> {after:.4f} "
        f"bits/byte, {metrics['result']['tokens_per_second']:,.0f} tokens/s, {metrics['result']['wall_seconds']:.1f} s"
    )
    held = "in float32" if metrics["quantized"] is None else f"held quantized ({metrics['quantized']})"
    if metrics["dtype"] == "bfloat16":  # what the run used: a resumed run's come from its state
        held = "in float32 on disk, held in bfloat16 for training"
    print(
        f"saved {metrics['saved']} ({metrics['saved_bytes']:,} bytes; the base's weights are "
        f"{metrics['base_weights_bytes']:,} bytes {held})"
    )


def add_merge_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="fold an adapter into its base: a plain checkpoint with no added latency",
        description="Merge a LoRA adapter into its base checkpoint (W + s A^T B^T) and save the result as an "
        "ordinary checkpoint of the base's size. With --base smollm2 the result is a Hugging Face checkpoint "
        "folder (config.json, model.safetensors) that transformers' LlamaForCausalLM loads; a quantized base "
        "(--quantized) is dequantized first.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_checkpoint_flag(parser, "--base")
    parser.add_argument("--adapter", required=True, help="the adapter directory")
    parser.add_argument(
        "--out", required=True, help="the merged checkpoint file to write (a folder for --base smollm2)"
    )
    parser.add_argument("--allow-base-mismatch", action="store_true")
    add_quantized_flag(parser, "--base smollm2: the base the adapter was trained on, held in blocks")
    parser.add_argument(
        "--dtype", choices=("float32", "float16"), default="float32",
        help="--base smollm2: the dtype of the merged weights in the file",
    )  # fmt: skip
    add_overwrite_flag(parser, "the result of an earlier merge in --out", "--force")
    add_device_flag(parser)
    parser.set_defaults(run=run_merge)


def merged_output_state(args):
    """How merge judges what is at --out already: a Hugging Face folder (smollm2) or a merged checkpoint file."""
    from functools import partial

    from ..io.checkpoint import checkpoint_output_state
    from ..io.run_folder import folder_output_state

    return (
        folder_output_state
        if args.base == SMOLLM2
        else partial(checkpoint_output_state, written_kind="merged")
    )


def check_merge_output(args) -> None:
    """Refuse, before the base loads, an --out that is an input, or holds what merge may not replace."""
    from ..io.bases import base_file
    from ..io.checkpoint import sidecar_path
    from ..io.run_folder import check_output

    if args.base != SMOLLM2:
        sidecar_path(args.out)  # a name its own JSON sidecar would overwrite is refused before the work
        if args.dtype != "float32":
            raise ValueError("--dtype applies to --base smollm2; a GPT checkpoint is merged in float32")
    inputs = [("--base", base_file(args.base)), ("--adapter", args.adapter)]
    check_output(args.out, "merge", args.overwrite, inputs, merged_output_state(args))


def run_merge(args) -> None:
    from ..io.adapters import load_adapter
    from ..io.bases import load_base

    check_merge_output(args)
    base = load_base(args.base, args.device, quantized=args.quantized)
    lora_model = load_adapter(base.model, args.adapter, args.allow_base_mismatch)
    merged = lora_model.merge_and_unload()
    if args.base == SMOLLM2:
        from ..io.hf_checkpoint import save_hf_llama

        save_hf_llama(merged, args.out, args.dtype, overwrite=args.overwrite)
        print(
            f"merged {len(lora_model.adapted_modules)} adapted weights into {args.out} "
            f"(a Hugging Face Llama checkpoint in {args.dtype}, {merged.num_parameters():,} parameters)"
        )
        return
    save_merged_checkpoint(args, base, lora_model, merged)
    print(
        f"merged {len(lora_model.adapted_modules)} adapted weights into {args.out} "
        f"({merged.num_parameters():,} parameters, as the base)"
    )


def save_merged_checkpoint(args, base, lora_model, merged) -> None:
    """The merged GPT as a checkpoint at --out, under the output's lock (replacing only an earlier merge's)."""
    from ..backend import resolve_device
    from ..io.checkpoint import save_checkpoint
    from ..io.provenance import provenance
    from ..io.run_folder import claimed_output

    metadata = {
        "kind": "merged",
        "config": merged.config.to_dict(),
        "base": base.name,
        "adapter": str(args.adapter),
        "lora_config": lora_model.lora_config.to_dict(),
        "provenance": provenance(resolve_device(args.device)),
    }
    with claimed_output(args.out, "merge", args.overwrite, merged_output_state(args)):
        save_checkpoint(args.out, merged.params, metadata)


def add_info_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe any file minilora writes: a checkpoint, an adapter or its run, PEFT, HF, GGUF",
        description="Print a checkpoint's config and parameter table; an adapter's LoRA settings, "
        "per-module table and trainable-parameter summary (and, for a run folder, what the run did); a "
        "PEFT adapter folder's or a Hugging Face checkpoint folder's config and tensors; or a GGUF file's.",
    )
    parser.add_argument(
        "path",
        help="a checkpoint file or run folder, an adapter folder, a PEFT or HF folder, or a .gguf file",
    )
    parser.set_defaults(run=run_info)


def run_info(args) -> None:
    from ..io.info import describe

    print(describe(args.path))


def add_peft_parsers(subparsers) -> None:
    export = subparsers.add_parser(
        "export-peft",
        help="write an adapter in Hugging Face PEFT's format",
        description="Convert a minilora adapter directory to PEFT's adapter_config.json and "
        "adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained on a "
        "transformers model holding the same base weights (GPT2LMHeadModel for a checkpoint, "
        "SmolLM2's LlamaForCausalLM for --base smollm2).",
    )
    add_checkpoint_flag(export, "--base")
    export.add_argument("--adapter", required=True, help="the minilora adapter directory")
    export.add_argument("--out", required=True, help="the PEFT adapter directory to write")
    add_overwrite_flag(export, "a PEFT adapter an earlier export-peft wrote in --out")
    export.add_argument("--allow-base-mismatch", action="store_true")
    add_device_flag(export)
    export.set_defaults(run=run_export_peft)
    imported = subparsers.add_parser(
        "import-peft",
        help="read a Hugging Face PEFT LoRA/DoRA adapter as a minilora adapter",
        description="Load a PEFT adapter directory onto a base checkpoint and save it as a minilora adapter "
        "(fingerprinted to that base).",
    )
    add_checkpoint_flag(imported, "--base")
    imported.add_argument("--peft", required=True, help="the PEFT adapter directory")
    imported.add_argument("--out", required=True, help="the minilora adapter directory to write")
    add_overwrite_flag(imported, "an adapter an earlier import-peft wrote in --out")
    add_device_flag(imported)
    imported.set_defaults(run=run_import_peft)


def run_export_peft(args) -> None:
    from ..io.adapters import load_adapter
    from ..io.bases import base_file, load_base
    from ..io.peft import export_peft
    from ..io.run_folder import check_output

    inputs = [("--base", base_file(args.base)), ("--adapter", args.adapter)]
    check_output(args.out, "export-peft", args.overwrite, inputs)
    base = load_base(args.base, args.device)
    model = load_adapter(base.model, args.adapter, allow_base_mismatch=args.allow_base_mismatch)
    path = export_peft(model, args.out, overwrite=args.overwrite)
    print(f"wrote {path} and its adapter_config.json ({len(model.adapted_modules)} adapted modules)")


def run_import_peft(args) -> None:
    from pathlib import Path

    from ..io.adapters import ADAPTER_WEIGHTS, save_adapter
    from ..io.bases import base_file, load_base
    from ..io.peft import import_peft
    from ..io.run_folder import check_output, write_output_folder

    check_output(
        args.out, "import-peft", args.overwrite, [("--base", base_file(args.base)), ("--peft", args.peft)]
    )
    model = import_peft(load_base(args.base, args.device).model, args.peft)
    extra = {"imported_from": str(args.peft)}

    def write(folder) -> None:
        save_adapter(model, folder, allow_noop=True, extra=extra)

    write_output_folder(args.out, write, "import-peft", args.overwrite)
    path = Path(args.out) / ADAPTER_WEIGHTS
    print(f"wrote {path} ({len(model.adapted_modules)} adapted modules, r={model.lora_config.r})")


def register(subparsers) -> None:
    add_finetune_parser(subparsers)
    add_merge_parser(subparsers)
    add_info_parser(subparsers)
    add_peft_parsers(subparsers)
