"""Fine-tuning a base model on a new corpus: with LoRA, or in full as the point of comparison.

LoRA mode trains only the adapter and saves only the adapter (``<out>/adapter.safetensors`` and
``adapter_config.json``), a few hundred kilobytes against the base's megabytes. Full mode trains
every weight and saves a whole checkpoint. Both write ``<out>/finetune_metrics.json`` with the
validation bits per byte before and after, the trainable parameter count, throughput and sizes,
and ``<out>/finetune_state.safetensors``, from which ``resume`` continues the run exactly.

The base is the shipped byte-level GPT, a checkpoint, or SmolLM2-135M-Instruct (io/bases.py); for
SmolLM2 the corpus is first encoded with its BPE tokenizer, and bits per byte divide by the bytes
the scored tokens spell, so the numbers compare across the two kinds of model.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

from ..backend import float_dtype, resolve_device, to_device
from ..fast import accelerate, use_fast_layers
from ..fast.distributed.world import current_world, from_writer
from ..io.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from ..io.bases import load_base
from ..io.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    check_params_fit,
    load_checkpoint,
    save_checkpoint,
    weights_fingerprint,
)
from ..io.data import load_corpus, tokenize_corpus
from ..io.provenance import provenance
from ..io.run_folder import claim_run_folder
from ..llama import set_activation_memory
from ..lora.accounting import model_summary_line
from ..lora.config import LoraConfig
from ..lora.model import add_lora
from ..optim import AdamW
from ..training.evaluate import bits_per_byte
from ..training.loop import TrainSettings, train_loop, train_step
from .resume import check_kind, check_resumable, resuming_line

METRICS_NAME = "finetune_metrics.json"
FULL_CHECKPOINT = "checkpoint.safetensors"
STATE_NAME = (
    "finetune_state.safetensors"  # what resuming needs: trainable tensors, optimiser state, arguments
)
RUN_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, FULL_CHECKPOINT, "checkpoint.json", STATE_NAME,
             "finetune_state.json", METRICS_NAME)  # fmt: skip
ADAM_BETAS = (0.9, 0.999)  # PEFT / transformers' Trainer default for fine-tuning


def make_optimizer(model, settings: TrainSettings, loraplus_ratio: float = 1.0) -> AdamW:
    """AdamW over exactly the model's trainable parameters (with LoRA: the adapter alone).

    loraplus_ratio > 1 is LoRA+: every lora_B trains with that multiple of the learning rate.
    """
    if loraplus_ratio <= 0:
        raise ValueError(f"loraplus_ratio must be > 0, got {loraplus_ratio}")
    lr_scale = {name: loraplus_ratio for name in model.trainable_names if name.endswith(".lora_B")}
    return AdamW(
        model.params,
        model.trainable_names,
        lr=settings.lr,
        betas=ADAM_BETAS,
        weight_decay=settings.weight_decay,
        lr_scale=lr_scale,
    )


def check_training_dtype(dtype: str, device: str, lora_config, quantized) -> None:
    """float32, or bfloat16 (mixed precision) for a LoRA adapter on a GPU over a plain base; else one line."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if dtype == "float32":
        return
    if device != "cuda":
        raise ValueError(
            "--dtype bfloat16 (mixed precision) runs on a GPU: add --device cuda, or leave out --dtype"
        )
    if lora_config is None:
        raise ValueError(
            "--dtype bfloat16 trains a LoRA adapter in float32 over a bf16 base; --full would need float32 "
            "master copies of every weight, which minilora does not keep: leave out --dtype"
        )
    if quantized is not None:
        raise ValueError(
            "--dtype bfloat16 and --quantized do not combine: a quantized base is decoded in float32"
        )


def fit(
    model,
    corpus,
    settings: TrainSettings,
    save=None,
    progress: bool = True,
    loraplus_ratio: float = 1.0,
    fast: bool = True,
):
    """Train any model (a GPT, or a LoraGPT's adapter) on a Corpus; returns the TrainResult.

    ``fast`` hands the model its device's fast path first (``minilora.fast.accelerate``: the fast
    layer functions and step); ``fast=False`` trains with the reference ``train_step`` as it is.
    """
    optimizer = make_optimizer(model, settings, loraplus_ratio)
    step = accelerate(model, optimizer, settings.grad_clip) if fast else train_step
    return train_loop(model, optimizer, corpus, settings, save, progress=progress, report=progress, step=step)


def finetune(
    base_spec,
    corpus: str,
    lora_config: LoraConfig | None,
    settings: TrainSettings,
    out_dir,
    device: str | None = None,
    progress: bool = True,
    loraplus_ratio: float = 1.0,
    block_size: int | None = None,
    quantized: str | None = None,
    gradient_checkpointing: bool = False,
    loss_chunk_rows: int | None = None,
    resume: bool = False,
    settings_overrides: dict | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
    say=print,
):
    """Fine-tune the base ``base_spec`` names (io/bases.py) on ``corpus``; LoRA unless ``lora_config`` is None.

    Returns (model, metrics dict). The adapter (or the full checkpoint) is saved after every
    evaluation, atomically, and with it ``<out>/finetune_state.safetensors``: the trainable tensors,
    the optimiser state and the run's arguments. ``resume`` continues from that file exactly as
    pretraining does (every argument but ``out_dir``, ``device`` and ``settings_overrides`` comes
    from it); without it, a folder that holds a run is refused unless ``overwrite``. The folder is
    locked for the whole run (io/run_folder.py). ``block_size``: the training windows of SmolLM2 (a
    GPT's is its own). ``quantized``: SmolLM2's frozen matrices held in blocks (QLoRA): "gguf" (the
    file's own), "q4_1", "q8_0" or "nf4". ``gradient_checkpointing`` and ``loss_chunk_rows``: the
    Llama model's switches that trade compute for activation memory (llama.py). ``dtype``
    "bfloat16" (LoRA on a GPU, over a GPT or SmolLM2): the frozen base and the activations in bf16,
    the adapter and its optimiser state in float32 (docs/gpu.md, mixed precision).
    """
    device = resolve_device(device)
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_NAME
    world = current_world()  # under mpirun: every rank trains, rank 0 alone writes (fast/distributed)
    progress = progress and world.is_writer
    claim = claim_run_folder(out_dir, RUN_FILES, resume, overwrite) if world.is_writer else nullcontext()
    with claim:
        state = load_checkpoint(state_path) if resume else None
        if state is not None:
            run = check_kind(state, state_path, "finetune")
            base_spec, corpus, block_size, quantized = (
                run[k] for k in ("base_spec", "corpus", "block_size", "quantized")
            )
            lora_config = None if run["lora_config"] is None else LoraConfig.from_dict(run["lora_config"])
            settings, loraplus_ratio = TrainSettings(**run["settings"]), run["loraplus_ratio"]
            gradient_checkpointing, loss_chunk_rows = run["gradient_checkpointing"], run["loss_chunk_rows"]
            dtype = run.get("dtype", "float32")
        settings = replace(settings, **(settings_overrides or {}))
        if quantized is not None and lora_config is None:
            raise ValueError("a quantized base is frozen: --quantized trains a LoRA adapter, not --full")
        check_training_dtype(dtype, device, lora_config, quantized)
        loaded = load_base(base_spec, device, block_size, quantized)
        if lora_config is None and not loaded.is_byte_level:
            raise ValueError(
                f"full fine-tuning of {loaded.name} is not supported: its checkpoint format is the GPT's; "
                "fine-tune it with LoRA (leave out --full)"
            )
        base = loaded.model
        model = base if lora_config is None else add_lora(base, lora_config, seed=settings.seed)
        set_activation_memory(model, gradient_checkpointing, loss_chunk_rows)
        if dtype == "bfloat16":
            from ..fast.cuda import use_cublas

            model.cast_base(float_dtype(dtype))  # after add_lora: the adapter was made in float32
            base.params.update(model.base_params)  # the base holds the bf16 copies: its float32 ones go
            use_fast_layers(model)  # the evaluation before training too runs the fused kernels
            use_cublas()  # and the bf16 products (CuPy's matmul has none)
        base_fingerprint = weights_fingerprint(base.params) if lora_config is None else model.base_fingerprint
        if state is not None and run["base_fingerprint"] != base_fingerprint:
            raise CheckpointError(f"{state_path} was trained on another base than {loaded.name} holds now")
        data = load_corpus(corpus)
        if not loaded.is_byte_level:
            data = tokenize_corpus(data, loaded.tokenizer)
        val_before = (
            run["val_bits_per_byte_before"]
            if state is not None
            else bits_per_byte(
                model, data.val, settings.batch_size, settings.eval_windows, token_bytes=data.token_bytes
            )
        )
        metadata = {
            "kind": "finetune",
            "mode": "full" if lora_config is None else "lora",
            "corpus": corpus,
            "base": loaded.name,
            "base_spec": None if base_spec is None else str(base_spec),  # as given (None: the shipped base)
            "block_size": block_size,
            "quantized": quantized,
            # the memory switches as the model holds them
            "gradient_checkpointing": getattr(model, "gradient_checkpointing", False),
            "loss_chunk_rows": getattr(model, "loss_chunk_rows", None),
            "dtype": dtype,
            "base_fingerprint": base_fingerprint,
            "config": model.config.to_dict(),
            "settings": asdict(settings),
            "lora_config": None if lora_config is None else lora_config.to_dict(),
            "loraplus_ratio": loraplus_ratio,
            "val_bits_per_byte_before": val_before,
            "provenance": provenance(device, settings.seed),
        }
        optimizer = make_optimizer(model, settings, loraplus_ratio)
        start_step = 0
        if state is not None:
            start_step = check_resumable(state, state_path, optimizer, settings.steps)
            trainable = {name: tuple(model.params[name].shape) for name in model.trainable_names}
            check_params_fit(state.params, trainable, state_path)
            for name in trainable:  # in place: the adapter (or the model) and the optimiser hold these arrays
                model.params[name][...] = to_device(state.params[name], device)
            optimizer.load_state_dict(state.optimizer)
            if world.is_writer:
                say(resuming_line(start_step, settings.steps, state_path))

        def save(step: int, val_bits_per_byte: float) -> None:
            progress_state = {"step": step, "val_bits_per_byte": val_bits_per_byte}
            if lora_config is None:
                save_checkpoint(out_dir / FULL_CHECKPOINT, model.params, {**metadata, **progress_state})
            else:
                training = {**progress_state, "corpus": corpus, "base": metadata["base"]}
                save_adapter(model, out_dir, extra={"training": training})
            trainable = {name: model.params[name] for name in model.trainable_names}
            save_checkpoint(state_path, trainable, {**metadata, **progress_state}, optimizer.state_dict())

        step = accelerate(model, optimizer, settings.grad_clip)
        result = train_loop(
            model,
            optimizer,
            data,
            settings,
            save if world.is_writer else None,
            start_step,
            progress,
            report=progress,
            step=step,
            saved_step=start_step if state is not None else None,
            saved_in=out_dir,
        )
        saved = out_dir / (FULL_CHECKPOINT if lora_config is None else ADAPTER_WEIGHTS)
        metrics = {
            **metadata,
            "trainable_params": model.num_parameters(trainable_only=True),
            "all_params": model.num_parameters(),
            "summary": model_summary_line(model),
            "val_bits_per_byte_after": result.evals[-1]["val_bits_per_byte"],
            "saved": str(saved),
            "saved_bytes": from_writer(world, lambda: saved.stat().st_size),  # rank 0 wrote it
            "base_weights_bytes": sum(int(v.nbytes) for v in base.params.values()),  # as held in memory
            "train_tokens": int(data.train.size),
            "result": result.to_dict(),
        }
        if world.is_writer:
            atomic_write_bytes(out_dir / METRICS_NAME, (json.dumps(metrics, indent=2) + "\n").encode())
    return model, metrics
