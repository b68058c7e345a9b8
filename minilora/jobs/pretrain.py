"""Pretraining a base model from scratch on a corpus, with checkpoints and exact resume.

This glues the pieces together: a corpus, a freshly initialised (or resumed) GPT, AdamW, the
training loop, and a results file. The checkpoint ``<out_dir>/checkpoint.safetensors`` carries the
config, the training settings and the corpus name, so ``resume`` needs nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from ..backend import resolve_device, to_device
from ..config import GPTConfig
from ..fast import accelerate
from ..io.checkpoint import check_blocks_present, check_params_fit, save_checkpoint
from ..io.data import load_corpus
from ..io.provenance import provenance
from ..model import GPT, init_params
from ..optim import AdamW
from ..training.loop import TrainSettings
from .resume import TrainingRun, claimed_run

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
    with claimed_run(out_dir, RUN_FILES, CHECKPOINT_NAME, "pretrain", resume, overwrite) as run:
        if run.state is not None:
            corpus, config, settings = saved_arguments(run.state.metadata)
        params = starting_weights(run, config, settings.seed, device)
        settings = replace(settings, **(settings_overrides or {}))
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
            save_checkpoint(run.state_path, model.params, state, optimizer.state_dict())

        step = accelerate(
            model, optimizer, settings.grad_clip, grad_accum=settings.grad_accum
        )  # the fast path
        result = run.train(model, optimizer, data, settings, save, start_step, step, progress, report=True)
        run.write_results(
            RESULTS_NAME, {**metadata, "parameters": model.num_parameters(), "result": result.to_dict()}
        )
    return model, result


def saved_arguments(metadata: dict) -> tuple[str, GPTConfig, TrainSettings]:
    """The corpus, config and settings that a pretraining checkpoint's metadata records."""
    return metadata["corpus"], GPTConfig.from_dict(metadata["config"]), TrainSettings(**metadata["settings"])


def starting_weights(run: TrainingRun, config: GPTConfig, seed: int, device: str) -> dict:
    """The weights training starts from: the resumed checkpoint's, checked against ``config``, or fresh ones."""
    checkpoint = run.state
    if checkpoint is None:
        return init_params(config, seed=seed, device=device)
    check_blocks_present(config.n_layer, checkpoint.params, run.state_path)  # before sizing by it
    check_params_fit(checkpoint.params, config.parameter_shapes(), run.state_path)
    return {name: to_device(checkpoint.params[name], device) for name in config.parameter_shapes()}
