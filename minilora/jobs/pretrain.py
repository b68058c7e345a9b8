"""Pretraining a base model from scratch on a corpus, with checkpoints and exact resume.

This glues the pieces together: a corpus, a freshly initialised (or resumed) GPT, AdamW, the
training loop, and a results file. The checkpoint ``<out_dir>/checkpoint.safetensors`` carries the
config, the training settings and the corpus name, so ``resume`` needs nothing else; the one saved
before it is kept as ``checkpoint.previous.safetensors``.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from ..backend import resolve_device, to_device
from ..config import GPTConfig
from ..fast import accelerate
from ..fast.distributed.agreement import agree_across_ranks
from ..io.checkpoint import (
    check_blocks_present,
    check_params_fit,
    keep_previous,
    previous_path,
    save_checkpoint,
)
from ..io.data import corpus_files, load_corpus
from ..io.provenance import provenance
from ..model import GPT, init_params
from ..optim import AdamW
from ..training.loop import TrainSettings
from .memory_check import FLOAT32_BYTES, TrainedModel, check_training_memory, parameter_count
from .resume import TrainingRun, check_saved_fields, claimed_run, saved_config, saved_settings

CHECKPOINT_NAME = "checkpoint.safetensors"
RESULTS_NAME = "pretrain_results.json"
KEPT_TWICE = (CHECKPOINT_NAME, "checkpoint.json")  # each save keeps the one before as <name>.previous
RUN_FILES = (*KEPT_TWICE, *(previous_path(name).name for name in KEPT_TWICE), RESULTS_NAME)  # a run's files
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
    refused unless ``overwrite`` (the new run replaces it when it ends), and ``out_dir`` must not be
    or hold the corpus file. The folder is locked for the whole run (io/run_folder.py).
    ``say`` prints the "resuming from step N" line.
    """
    device = resolve_device(device)
    inputs = [] if resume else [("--corpus", path) for path in corpus_files(corpus)]
    with claimed_run(out_dir, RUN_FILES, CHECKPOINT_NAME, "pretrain", resume, overwrite, inputs) as run:
        if run.state is not None:
            corpus, config, settings = saved_arguments(run.state, run.state_path)
        settings = replace(settings, **(settings_overrides or {}))
        check_pretrain_memory(config, settings.batch_size, fresh=run.state is None, device=device)
        params = starting_weights(run, config, settings.seed, device)
        model = GPT(config, params)
        optimizer = AdamW(
            params,
            model.trainable_names,
            lr=settings.lr,
            betas=ADAM_BETAS,
            weight_decay=settings.weight_decay,
        )
        start_step = run.resume_optimizer(optimizer, settings.steps, say)
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
            keep_previous(run.state_path)
            save_checkpoint(run.state_path, model.params, state, optimizer.state_dict())

        agree_across_ranks(run.world, metadata, optimizer, data, start_step)  # mpirun: the same run, or none
        step = accelerate(
            model, optimizer, settings.grad_clip, grad_accum=settings.grad_accum
        )  # the fast path
        result = run.train(model, optimizer, data, settings, save, start_step, step, progress, report=True)
        run.write_results(
            RESULTS_NAME, {**metadata, "parameters": model.num_parameters(), "result": result.to_dict()}
        )
    return model, result


def saved_arguments(checkpoint, path) -> tuple[str, GPTConfig, TrainSettings]:
    """The corpus, config and settings that a pretraining checkpoint records (``path``: its file), checked.

    The config is checked against the blocks the checkpoint holds before anything is sized by it.
    """
    metadata = checkpoint.metadata
    check_saved_fields(metadata, ("config",), path)
    config = saved_config(GPTConfig, metadata["config"], path)
    check_blocks_present(config.n_layer, checkpoint.params, path)
    check_saved_fields(metadata, ("corpus", "settings"), path)
    return metadata["corpus"], config, saved_settings(metadata["settings"], path)


def check_pretrain_memory(config: GPTConfig, batch_size: int, fresh: bool, device: str) -> None:
    """Refuse, before the weights are drawn, a model or batch that surely cannot fit (jobs/memory_check.py)."""
    parameters = parameter_count(config)
    model = TrainedModel(
        f"the model of --n-layer {config.n_layer}, --n-embd {config.n_embd}",
        "lower --n-layer or --n-embd, or choose a smaller --preset",
        trainable=parameters,
        new_weights=parameters if fresh else 0,  # a resumed run's weights are loaded already
        itemsize=FLOAT32_BYTES,
    )
    check_training_memory(config, batch_size, model, device)


def starting_weights(run: TrainingRun, config: GPTConfig, seed: int, device: str) -> dict:
    """The weights training starts from: the resumed checkpoint's, checked against ``config``, or fresh ones."""
    checkpoint = run.state
    if checkpoint is None:
        return init_params(config, seed=seed, device=device)
    check_params_fit(checkpoint.params, config.parameter_shapes(), run.state_path)
    return {name: to_device(checkpoint.params[name], device) for name in config.parameter_shapes()}
