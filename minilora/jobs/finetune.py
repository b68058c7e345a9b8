"""Fine-tuning a base model on a new corpus: with LoRA, or in full as the point of comparison.

LoRA mode trains only the adapter and saves only the adapter (``<out>/adapter.safetensors`` and
``adapter_config.json``), a few hundred kilobytes against the base's megabytes. Full mode trains
every weight and saves a whole checkpoint. Both write ``<out>/finetune_metrics.json`` with the
validation bits per byte before and after, the trainable parameter count, throughput and sizes,
and ``<out>/finetune_state.safetensors``, from which ``resume`` continues the run exactly. Each save
keeps the one before it (``adapter.previous.safetensors``, ``finetune_state.previous.safetensors``).

The base is the shipped byte-level GPT, a checkpoint, or SmolLM2-135M-Instruct (io/bases.py); for
SmolLM2 the corpus is first encoded with its BPE tokenizer, and bits per byte divide by the bytes
the scored tokens spell, so the numbers compare across the two kinds of model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..backend import float_dtype, resolve_device, to_device, weights_fingerprint
from ..fast import accelerate, use_fast_layers
from ..fast.distributed.agreement import agree_across_ranks
from ..fast.distributed.world import current_world, from_writer
from ..io.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from ..io.bases import Base, base_file, load_base
from ..io.checkpoint import CheckpointError, check_params_fit, keep_previous, previous_path, save_checkpoint
from ..io.data import corpus_files, load_corpus
from ..io.provenance import provenance
from ..lora.accounting import model_summary_line
from ..lora.config import LoraConfig
from ..lora.model import add_lora
from ..optim import AdamW
from ..training.loop import TrainSettings, train_loop
from .memory_check import TrainedModel, check_training_memory
from .resume import TrainingRun, check_saved_fields, claimed_run, saved_config, saved_settings

METRICS_NAME = "finetune_metrics.json"
FULL_CHECKPOINT = "checkpoint.safetensors"
STATE_NAME = (
    "finetune_state.safetensors"  # what resuming needs: trainable tensors, optimiser state, arguments
)
KEPT_TWICE = (ADAPTER_WEIGHTS, FULL_CHECKPOINT, "checkpoint.json", STATE_NAME, "finetune_state.json")
RUN_FILES = (*KEPT_TWICE, *(previous_path(name).name for name in KEPT_TWICE), ADAPTER_CONFIG,
             METRICS_NAME)  # fmt: skip
ADAM_BETAS = (0.9, 0.999)  # PEFT / transformers' Trainer default for fine-tuning
# What a state file must hold to be resumed ("dtype" may be missing: written before bf16 training, float32).
SAVED_RUN_FIELDS = ("base_spec", "corpus", "lora_config", "settings", "loraplus_ratio", "block_size", "quantized",
                    "gradient_checkpointing", "loss_chunk_rows", "base_fingerprint",
                    "val_bits_per_byte_before")  # fmt: skip


def say_now(line: str) -> None:
    """Print a line and flush it, so that a log file shows it while the run goes on."""
    print(line, flush=True)


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
        no_decay=model.no_decay,
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
    layer functions and step); ``fast=False`` trains with the reference halves (``TrainingStep``).
    Both accumulate ``settings.grad_accum`` micro-batches per optimiser step.
    """
    optimizer = make_optimizer(model, settings, loraplus_ratio)
    if fast:  # under mpirun the fast step is data parallel: every rank's run the same, or none
        described = {
            "settings": asdict(settings),
            "config": model.config.to_dict(),
            "loraplus_ratio": loraplus_ratio,
        }
        agree_across_ranks(current_world(), described, optimizer, corpus, start_step=0)
    step = accelerate(model, optimizer, settings.grad_clip, grad_accum=settings.grad_accum) if fast else None
    return train_loop(model, optimizer, corpus, settings, save, progress=progress, report=progress, step=step)


@dataclass(frozen=True)
class FinetuneRun:
    """What one fine-tuning run is, as its state file records it: ``resume`` continues this very run."""

    base_spec: str | None  # io/bases.py; None: the shipped base
    corpus: str
    lora_config: LoraConfig | None  # None: full fine-tuning
    settings: TrainSettings
    loraplus_ratio: float
    block_size: int | None
    quantized: str | None
    gradient_checkpointing: bool
    loss_chunk_rows: int | None
    dtype: str
    train_on_prompt: bool = False  # conversations: train on every token, not the assistant's alone
    packing: bool = False  # conversations: several per row (training/examples.py), not one per row

    @classmethod
    def from_metadata(cls, saved: dict, path) -> FinetuneRun:
        """The run that a finetune state file's metadata describes (``path``: the file), every field checked."""
        check_saved_fields(saved, SAVED_RUN_FIELDS, path)
        lora_config = (
            None if saved["lora_config"] is None else saved_config(LoraConfig, saved["lora_config"], path)
        )
        return cls(
            base_spec=saved["base_spec"],
            corpus=saved["corpus"],
            lora_config=lora_config,
            settings=saved_settings(saved["settings"], path),
            loraplus_ratio=saved["loraplus_ratio"],
            block_size=saved["block_size"],
            quantized=saved["quantized"],
            gradient_checkpointing=saved["gradient_checkpointing"],
            loss_chunk_rows=saved["loss_chunk_rows"],
            dtype=saved.get("dtype", "float32"),  # written before bf16 training existed: float32
            # written before loss masks (0.2): such a run resumes with the assistant's tokens, padded
            train_on_prompt=saved.get("train_on_prompt", False),
            packing=saved.get("packing", False),
        )

    @property
    def mode(self) -> str:
        return "full" if self.lora_config is None else "lora"


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
    train_on_prompt: bool = False,
    packing: bool = False,
    say=say_now,
):
    """Fine-tune the base ``base_spec`` names (io/bases.py) on ``corpus``; LoRA unless ``lora_config`` is None.

    Returns (model, metrics dict). The adapter (or the full checkpoint) is saved after every
    evaluation, atomically, and with it ``<out>/finetune_state.safetensors``: the trainable tensors,
    the optimiser state and the run's arguments. ``resume`` continues from that file exactly as
    pretraining does (every argument but ``out_dir``, ``device`` and ``settings_overrides`` comes
    from it); without it, a folder that holds a run is refused unless ``overwrite`` (the new run
    replaces it when it ends), and ``out_dir`` must not be or hold the base or the corpus file.
    The folder is locked for the whole run (io/run_folder.py). ``block_size``: the training windows
    of SmolLM2 (a GPT's is its own). ``quantized``: SmolLM2's frozen matrices held in blocks (QLoRA): "gguf" (the
    file's own), "q4_1", "q8_0" or "nf4". ``gradient_checkpointing`` and ``loss_chunk_rows``: the
    switches that trade compute for activation memory, in both families (activation_memory.py). ``dtype``
    "bfloat16" (LoRA on a GPU, over a GPT or SmolLM2): the frozen base and the activations in bf16,
    the adapter and its optimiser state in float32 (docs/gpu.md, mixed precision). For conversations
    (io/chat_data.py), ``train_on_prompt`` trains on every token instead of the assistant's, and
    ``packing`` puts several conversations in a row (training/examples.py).
    """
    device = resolve_device(device)
    asked = FinetuneRun(base_spec, corpus, lora_config, settings, loraplus_ratio, block_size, quantized,
                        gradient_checkpointing, loss_chunk_rows, dtype, train_on_prompt, packing)  # fmt: skip
    inputs = [] if resume else files_read(base_spec, corpus)
    with claimed_run(out_dir, RUN_FILES, STATE_NAME, "finetune", resume, overwrite, inputs) as run:
        job = asked if run.state is None else resumed_run(asked, run)
        job = replace(job, settings=replace(job.settings, **(settings_overrides or {})))
        check_finetune_run(job, device)
        loaded, model = build_model(job, device)
        check_finetune_memory(job, model, device)
        fingerprint = base_fingerprint(run, job, loaded, model)
        data = finetune_corpus(job, loaded)
        val_before = validation_before(run, model, data, job.settings, progress, say)
        metadata = run_metadata(job, loaded, model, fingerprint, val_before, device)
        optimizer = make_optimizer(model, job.settings, job.loraplus_ratio)
        start_step = resume_trainable(run, model, optimizer, job.settings.steps, device, say)
        save = saver(run, model, optimizer, job, metadata)
        agree_across_ranks(run.world, metadata, optimizer, data, start_step)  # mpirun: the same run, or none
        step = accelerate(model, optimizer, job.settings.grad_clip, grad_accum=job.settings.grad_accum)
        result = run.train(model, optimizer, data, job.settings, save, start_step, step, progress,
                           report=progress, kept_name=deliverable_name(job))  # fmt: skip
        metrics = final_metrics(run, job, loaded.model, model, metadata, data, result)
        run.write_results(METRICS_NAME, metrics)
    return model, metrics


def files_read(base_spec, corpus: str) -> list:
    """(flag, path) of every file a new run reads, which its folder must neither be nor hold."""
    return [("--base", base_file(base_spec)), *(("--corpus", path) for path in corpus_files(corpus))]


def resumed_run(asked: FinetuneRun, run: TrainingRun) -> FinetuneRun:
    """The run ``run``'s state file describes; a --quantized that contradicts it is refused (one line)."""
    saved = FinetuneRun.from_metadata(run.state.metadata, run.state_path)
    if asked.quantized is not None and asked.quantized != saved.quantized:
        trained = "without --quantized" if saved.quantized is None else f"with --quantized {saved.quantized}"
        raise CheckpointError(
            f"--quantized {asked.quantized} contradicts the run it resumes: {run.state_path} was trained "
            f"{trained}; leave the flag out (--resume continues the saved run as it was)"
        )
    return saved


def check_finetune_memory(job: FinetuneRun, model, device: str) -> None:
    """Refuse, before the first batch, a --batch-size whose step surely cannot fit (jobs/memory_check.py)."""
    trainable = model.num_parameters(trainable_only=True)
    full = job.lora_config is None
    trained = TrainedModel(
        "--full" if full else "the adapter",
        "train a LoRA adapter instead (leave out --full)" if full else "lower --r",
        trainable=trainable,
        new_weights=0 if full else trainable,  # the adapter is made here; the base was loaded
        itemsize=model.params[model.embedding_name].dtype.itemsize,  # the activations': the base's dtype
    )
    check_training_memory(model.config, job.settings.batch_size, trained, device)


def check_finetune_run(job: FinetuneRun, device: str) -> None:
    """Refuse, before any weight is loaded, what this run cannot train (one line each)."""
    if job.quantized is not None and job.lora_config is None:
        raise ValueError("a quantized base is frozen: --quantized trains a LoRA adapter, not --full")
    check_training_dtype(job.dtype, device, job.lora_config, job.quantized)


def build_model(job: FinetuneRun, device: str) -> tuple[Base, object]:
    """The loaded base and the model to train on it: the base with its adapter, or the base itself (full)."""
    loaded = load_base(job.base_spec, device, job.block_size, job.quantized)
    if job.lora_config is None and not loaded.is_byte_level:
        raise ValueError(
            f"full fine-tuning of {loaded.name} is not supported: its checkpoint format is the GPT's; "
            "fine-tune it with LoRA (leave out --full)"
        )
    base = loaded.model
    model = base if job.lora_config is None else add_lora(base, job.lora_config, seed=job.settings.seed)
    model.set_activation_memory(job.gradient_checkpointing, job.loss_chunk_rows)
    if job.dtype == "bfloat16":
        hold_base_in_bfloat16(model, base)
    return loaded, model


def hold_base_in_bfloat16(model, base) -> None:
    """Mixed precision: the frozen base in bf16 under the float32 adapter, trained by the bf16 kernels."""
    from ..fast.cuda import use_cublas

    model.cast_base(float_dtype("bfloat16"))  # after add_lora: the adapter was made in float32
    base.params.update(model.base_params)  # the base holds the bf16 copies: its float32 ones go
    use_fast_layers(model)  # the evaluation before training too runs the fused kernels
    use_cublas()  # and the bf16 products (CuPy's matmul has none)


def base_fingerprint(run: TrainingRun, job: FinetuneRun, loaded: Base, model) -> str:
    """The fingerprint of the frozen base (of every weight, for --full); a resumed run's must be unchanged."""
    fingerprint = weights_fingerprint(model.params) if job.lora_config is None else model.base_fingerprint
    if run.state is not None and run.state.metadata["base_fingerprint"] != fingerprint:
        raise CheckpointError(f"{run.state_path} was trained on another base than {loaded.name} holds now")
    return fingerprint


def finetune_corpus(job: FinetuneRun, loaded: Base):
    """The run's corpus in the base's tokens (bytes for a GPT, SmolLM2's BPE ids), masked and laid out as asked."""
    data = load_corpus(job.corpus)
    data = data if loaded.is_byte_level else data.encoded(loaded.tokenizer)
    return data.configured(job.train_on_prompt, job.packing)


def validation_before(run: TrainingRun, model, data, settings: TrainSettings, progress: bool, say) -> float:
    """Bits per byte of the untrained model on the validation split (a resumed run's, as it was saved).

    With ``progress``, a line says what it scores and a bar shows how far it is.
    """
    if run.state is not None:
        return run.state.metadata["val_bits_per_byte_before"]
    if progress:
        say(f"before training: {data.evaluation_line(model.config.block_size, settings.eval_windows)}")
    return data.val_bits_per_byte(model, settings.batch_size, settings.eval_windows, progress)


def run_metadata(
    job: FinetuneRun, loaded: Base, model, fingerprint: str, val_before: float, device: str
) -> dict:
    """What every save records of the run: its arguments, its base, the model's config, its starting point."""
    return {
        "kind": "finetune",
        "mode": job.mode,
        "corpus": job.corpus,
        "base": loaded.name,
        # as given (None: the shipped base)
        "base_spec": None if job.base_spec is None else str(job.base_spec),
        "block_size": job.block_size,
        "quantized": job.quantized,
        # the memory switches as the model holds them
        "gradient_checkpointing": model.gradient_checkpointing,
        "loss_chunk_rows": model.loss_chunk_rows,
        "dtype": job.dtype,
        "train_on_prompt": job.train_on_prompt,
        "packing": job.packing,
        "base_fingerprint": fingerprint,
        "config": model.config.to_dict(),
        "settings": asdict(job.settings),
        "lora_config": None if job.lora_config is None else job.lora_config.to_dict(),
        "loraplus_ratio": job.loraplus_ratio,
        "val_bits_per_byte_before": val_before,
        "provenance": provenance(device, job.settings.seed),
    }


def resume_trainable(run: TrainingRun, model, optimizer: AdamW, steps: int, device: str, say) -> int:
    """The step training starts at; a resumed run's trainable tensors and optimiser state are restored first."""
    if run.state is not None:
        trainable = {name: tuple(model.params[name].shape) for name in model.trainable_names}
        check_params_fit(run.state.params, trainable, run.state_path)
        for name in trainable:  # in place: the adapter (or the model) and the optimiser hold these arrays
            model.params[name][...] = to_device(run.state.params[name], device)
    return run.resume_optimizer(optimizer, steps, say)


def saver(run: TrainingRun, model, optimizer: AdamW, job: FinetuneRun, metadata: dict):
    """The ``save`` for train_loop: the adapter (or the full checkpoint), then the state that resumes the run."""

    def save(step: int, val_bits_per_byte: float) -> None:
        progress_state = {"step": step, "val_bits_per_byte": val_bits_per_byte}
        keep_previous(run.folder / deliverable_name(job), sidecar=job.lora_config is None)
        if job.lora_config is None:
            save_checkpoint(run.folder / FULL_CHECKPOINT, model.params, {**metadata, **progress_state})
        else:
            training = {**progress_state, "corpus": job.corpus, "base": metadata["base"]}
            save_adapter(model, run.folder, extra={"training": training})
        trainable = {name: model.params[name] for name in model.trainable_names}
        keep_previous(run.state_path)
        save_checkpoint(run.state_path, trainable, {**metadata, **progress_state}, optimizer.state_dict())

    return save


def deliverable_name(job: FinetuneRun) -> str:
    """The file a run delivers: the adapter's weights, or the whole checkpoint of full fine-tuning."""
    return FULL_CHECKPOINT if job.lora_config is None else ADAPTER_WEIGHTS


def final_metrics(run: TrainingRun, job: FinetuneRun, base, model, metadata: dict, data, result) -> dict:
    """finetune_metrics.json: the run's metadata, its sizes and parameter counts, and the training's result."""
    saved = run.folder / deliverable_name(job)
    return {
        **metadata,
        "trainable_params": model.num_parameters(trainable_only=True),
        "all_params": model.num_parameters(),
        "summary": model_summary_line(model),
        "val_bits_per_byte_after": result.evals[-1]["val_bits_per_byte"],
        "saved": str(run.out / saved.name),  # where it is once the run ends
        "saved_bytes": from_writer(run.world, lambda: saved.stat().st_size),  # rank 0 wrote it
        "base_weights_bytes": sum(int(v.nbytes) for v in base.params.values()),  # as held in memory
        "train_tokens": int(data.train.size),
        "result": result.to_dict(),
    }
