"""Pretraining a base model from scratch on a corpus, with checkpoints and exact resume.

This glues the pieces together: a corpus, a freshly initialised (or resumed) GPT, AdamW, the
training loop, and a results file. The checkpoint ``<out_dir>/checkpoint.safetensors`` carries the
config, the training settings and the corpus name, so ``resume`` needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from ..backend import resolve_device, to_device
from ..config import GPTConfig
from ..fast import accelerate
from ..io.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    check_params_fit,
    load_checkpoint,
    save_checkpoint,
)
from ..io.data import load_corpus
from ..io.provenance import provenance
from ..model import GPT, init_params, parameter_shapes
from ..optim import AdamW
from ..training.loop import TrainSettings, train_loop

CHECKPOINT_NAME = "checkpoint.safetensors"
RESULTS_NAME = "pretrain_results.json"
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
):
    """Train a base model; returns (model, TrainResult).

    With ``resume``, the corpus, config, settings, weights and optimiser state come from
    ``<out_dir>/checkpoint.safetensors`` (``config``, ``settings`` and ``corpus`` are ignored), and
    ``settings_overrides`` may change settings such as ``steps`` (anything but ``steps`` changes
    the run, so it is no longer an exact continuation).
    """
    device = resolve_device(device)
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    start_step, optimizer_state = 0, None
    if resume:
        checkpoint = load_checkpoint(checkpoint_path)
        meta = checkpoint.metadata
        if meta.get("kind") != "pretrain":
            raise CheckpointError(
                f"{checkpoint_path} is not a pretraining checkpoint (kind {meta.get('kind')!r})"
            )
        corpus, config = meta["corpus"], GPTConfig.from_dict(meta["config"])
        settings = TrainSettings(**meta["settings"])
        check_params_fit(checkpoint.params, parameter_shapes(config), checkpoint_path)
        params = {name: to_device(checkpoint.params[name], device) for name in parameter_shapes(config)}
        start_step, optimizer_state = meta["step"], checkpoint.optimizer
    else:
        params = init_params(config, seed=settings.seed, device=device)
    settings = replace(settings, **(settings_overrides or {}))
    data = load_corpus(corpus)
    model = GPT(config, params)
    optimizer = AdamW(
        params, model.trainable_names, lr=settings.lr, betas=ADAM_BETAS, weight_decay=settings.weight_decay
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
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
    result = train_loop(model, optimizer, data, settings, save, start_step, progress, step=step)
    summary = {**metadata, "parameters": model.num_parameters(), "result": result.to_dict()}
    atomic_write_bytes(out_dir / RESULTS_NAME, (json.dumps(summary, indent=2) + "\n").encode())
    return model, result
