"""Pretraining a base model from scratch on a corpus, with checkpoints and exact resume.

This glues the pieces together: a corpus, a freshly initialised (or resumed) GPT, AdamW, the
training loop, and a results file. The checkpoint ``<out_dir>/checkpoint.safetensors`` carries the
config, the training settings and the corpus name, so ``resume`` needs nothing else.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

from ..backend import resolve_device, to_device
from ..config import GPTConfig
from ..fast import accelerate
from ..fast.distributed.world import current_world
from ..io.checkpoint import (
    atomic_write_bytes,
    check_blocks_present,
    check_params_fit,
    load_checkpoint,
    save_checkpoint,
)
from ..io.data import load_corpus
from ..io.provenance import provenance
from ..io.run_folder import claim_run_folder
from ..model import GPT, init_params, parameter_shapes
from ..optim import AdamW
from ..training.loop import TrainSettings, train_loop
from .resume import check_kind, check_resumable, resuming_line

CHECKPOINT_NAME = "checkpoint.safetensors"
RESULTS_NAME = "pretrain_results.json"
RUN_FILES = (CHECKPOINT_NAME, "checkpoint.json", RESULTS_NAME)  # what marks a folder as holding a run
ADAM_BETAS = (0.9, 0.95)  # GPT-2 / nanoGPT practice for small-batch language-model training


def pretrain(
    corpus: str,
    config: GPTConfig,
    settings: TrainSettings,
    out_dir,
    device: str | None = None,
    resume: bool = False,
    settings_overrides: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
    say=print,
):
    """Train a base model; returns (model, TrainResult).

    With ``resume``, the corpus, config, settings, weights and optimiser state come from
    ``<out_dir>/checkpoint.safetensors`` (``config``, ``settings`` and ``corpus`` are ignored), and
    ``settings_overrides`` may change settings such as ``steps`` (anything but ``steps`` changes
    the run, so it is no longer an exact continuation). Without it, a folder that holds a run is
    refused unless ``overwrite``. The folder is locked for the whole run (io/run_folder.py).
    ``say`` prints the "resuming from step N" line.
    """
    device = resolve_device(device)
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    world = current_world()  # under mpirun: every rank trains, rank 0 alone writes (fast/distributed)
    progress = progress and world.is_writer
    claim = claim_run_folder(out_dir, RUN_FILES, resume, overwrite) if world.is_writer else nullcontext()
    with claim:
        checkpoint = load_checkpoint(checkpoint_path) if resume else None
        if checkpoint is not None:
            meta = check_kind(checkpoint, checkpoint_path, "pretrain")
            corpus, config = meta["corpus"], GPTConfig.from_dict(meta["config"])
            settings = TrainSettings(**meta["settings"])
            check_blocks_present(config.n_layer, checkpoint.params, checkpoint_path)  # before sizing by it
            check_params_fit(checkpoint.params, parameter_shapes(config), checkpoint_path)
            params = {name: to_device(checkpoint.params[name], device) for name in parameter_shapes(config)}
        else:
            params = init_params(config, seed=settings.seed, device=device)
        settings = replace(settings, **(settings_overrides or {}))
        model = GPT(config, params)
        optimizer = AdamW(
            params,
            model.trainable_names,
            lr=settings.lr,
            betas=ADAM_BETAS,
            weight_decay=settings.weight_decay,
        )
        start_step = 0
        if checkpoint is not None:
            start_step = check_resumable(checkpoint, checkpoint_path, optimizer, settings.steps)
            optimizer.load_state_dict(checkpoint.optimizer)
            if world.is_writer:
                say(resuming_line(start_step, settings.steps, checkpoint_path))
        data = load_corpus(corpus)
        metadata = {
            "kind": "pretrain",
            "corpus": corpus,
            "config": config.to_dict(),
            "settings": asdict(settings),
            "provenance": provenance(device, settings.seed),
        }

        def save(step: int, val_bits_per_byte: float) -> None:
            state = {**metadata, "step": step, "val_bits_per_byte": val_bits_per_byte}
            save_checkpoint(checkpoint_path, model.params, state, optimizer.state_dict())

        step = accelerate(model, optimizer, settings.grad_clip)  # the device's fast layer functions and step
        result = train_loop(
            model,
            optimizer,
            data,
            settings,
            save if world.is_writer else None,
            start_step,
            progress,
            report=world.is_writer,
            step=step,
            saved_step=start_step if checkpoint is not None else None,
            saved_in=out_dir,
        )
        summary = {**metadata, "parameters": model.num_parameters(), "result": result.to_dict()}
        if world.is_writer:
            atomic_write_bytes(out_dir / RESULTS_NAME, (json.dumps(summary, indent=2) + "\n").encode())
    return model, result
