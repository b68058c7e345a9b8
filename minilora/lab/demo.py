"""The demo: teach a modern-spelling Shakespeare model the First Folio's spelling with LoRA.

The shipped base model was pretrained on Shakespeare in modern spelling. The First Folio of 1623
spells the same words differently ("haue", "loue", "vnto", "selfe"). The demo measures the base on
the held-out Folio plays, trains a LoRA adapter (about 2% of the weights) on the Folio training
plays, and measures again: on the Folio (what was learned) and on the modern plays (what was
forgotten). It counts Folio spellings in text sampled before and after, merges the adapter and
checks that the merged model computes the same logits, and times generation with the base, the
unmerged adapter and the merged model, which should cost the same as the base.

Everything is written to the output directory: results.json, loss_curve.png and the adapter. The
demo owns that directory: running it again replaces those files (each written atomically) without
asking, unlike ``pretrain`` and ``finetune``, which refuse a folder holding a run.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..backend import resolve_device, synchronize, to_numpy
from ..fast import accelerate_generation, fast_ops
from ..fast.cpu.inference import one_blas_thread
from ..generate import generate, generate_ids
from ..io.adapters import ADAPTER_WEIGHTS, save_adapter
from ..io.checkpoint import atomic_write_bytes, load_model
from ..io.data import SHIPPED_BASE, load_corpus
from ..io.provenance import provenance
from ..jobs.finetune import fit
from ..lora.accounting import format_table, lora_parameter_table, model_summary_line
from ..lora.config import LoraConfig
from ..lora.model import add_lora
from ..training.evaluate import bits_per_byte
from ..training.loop import TrainSettings
from .plots import plot_loss_curve

# Spellings frequent in the Folio and absent from the modern-spelling texts (checked on the corpora).
FOLIO_SPELLINGS = (
    "vnto",
    "selfe",
    "haue",
    "doe",
    "onely",
    "euery",
    "loue",
    "giue",
    "vpon",
    "heere",
    "beene",
    "owne",
    "vs",
    "vp",
    "mee",
    "hee",
    "shee",
    "againe",
)
_FOLIO_PATTERN = re.compile(r"\b(" + "|".join(FOLIO_SPELLINGS) + r")\b", re.IGNORECASE)


@dataclass(frozen=True)
class DemoSettings:
    lora_config: LoraConfig = LoraConfig(
        r=8, lora_alpha=16.0, target_modules=("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    steps: int = 80  # LoRA training steps on the Folio plays
    batch_size: int = 8  # sequences of the base's block size (256 bytes) per step
    lr: float = 5e-3
    eval_windows: int = 32  # validation windows per measurement, spread over each held-out set
    prompt: str = "KING.\n"
    samples: int = 3  # seeded samples per model for the spelling count
    sample_chars: int = 400  # bytes generated per sample
    timing_tokens: int = 300  # bytes generated per timed run
    seed: int = 0


QUICK_DEMO = DemoSettings(steps=4, batch_size=2, eval_windows=2, samples=1, sample_chars=40, timing_tokens=10)
"""``minilora demo --quick``: every stage of the demo in seconds, to check an install (CI runs it)."""


def folio_spellings_per_1000(text: str) -> float:
    """How many Folio-only spellings occur per 1,000 characters of text."""
    return 1000 * len(_FOLIO_PATTERN.findall(text)) / max(1, len(text))


def samples_of(model, settings: DemoSettings, decoder=generate_ids) -> list[str]:
    """Seeded continuations of the prompt (seeds 0, 1, ...), without the prompt itself."""
    return [
        generate(
            model,
            settings.prompt,
            settings.sample_chars,
            temperature=0.8,
            top_k=None,
            seed=seed,
            decoder=decoder,
        )[len(settings.prompt) :]
        for seed in range(settings.samples)
    ]


def time_generation(model, settings: DemoSettings, repeats: int = 3, decoder=generate_ids) -> float:
    """Median seconds to generate ``timing_tokens`` bytes (after a warm-up run)."""
    generate(model, settings.prompt, 8, seed=0, decoder=decoder)
    times = []
    for _ in range(repeats):
        synchronize(model.xp)
        started = time.perf_counter()
        generate(model, settings.prompt, settings.timing_tokens, seed=0, decoder=decoder)
        synchronize(model.xp)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


@contextmanager
def timed(phases: dict, name: str, xp):
    """Add the seconds the block takes, its device work finished, to ``phases[name]``."""
    started = time.perf_counter()
    yield
    synchronize(xp)
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - started


@one_blas_thread()  # on the CPU, training's thread policy for every stage, evaluation and sampling too
def run_demo(
    out_dir,
    device: str | None = None,
    settings: DemoSettings = DemoSettings(),
    base_path=SHIPPED_BASE,
    say=print,
    fast_generation: bool = True,
) -> dict:
    """Run the demo, printing as it goes through ``say``; returns (and writes) the results.

    fast_generation: generate through the device's fast decoder (``minilora.fast.accelerate_generation``:
    on a GPU the one-token step as a CUDA graph); False keeps the reference generation.
    """
    started = time.perf_counter()
    phases = {}  # seconds per phase of the demo, reported in results.json
    device = resolve_device(device)
    out_dir = Path(out_dir)
    with timed(phases, "load", np):
        base = load_model(base_path, device)
        base.ops = fast_ops(base.xp)  # the device's fast layer functions, as training hands the adapted model
        folio, modern = load_corpus("shakespeare_folio"), load_corpus("shakespeare_modern")
    xp = base.xp

    def decoder(model):
        return accelerate_generation(model) if fast_generation else generate_ids

    def bpb(model, corpus):
        return bits_per_byte(
            model, corpus.val, batch_size=settings.batch_size, max_windows=settings.eval_windows
        )

    say(
        f"base model: {base_path.name if isinstance(base_path, Path) else base_path}, "
        f"{base.num_parameters():,} parameters, on {device}"
    )
    with timed(phases, "evaluate", xp):
        before = {"folio": bpb(base, folio), "modern": bpb(base, modern)}
    say(
        f"held-out Folio plays (Hamlet, Macbeth, The Tempest): {before['folio']:.4f} bits/byte; "
        f"the same plays in modern spelling: {before['modern']:.4f}"
    )
    with timed(phases, "generate samples", xp):
        samples_before = samples_of(base, settings, decoder(base))

    lora_config = settings.lora_config
    with timed(phases, "add adapter", xp):
        model = add_lora(base, lora_config, seed=settings.seed)
    say("\n" + format_table(lora_parameter_table(lora_config, base.config)))
    say(model_summary_line(model))
    train_settings = TrainSettings(
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        min_lr=settings.lr / 10,
        warmup_steps=10,
        weight_decay=0.0,
        eval_interval=max(1, settings.steps // 2),
        eval_windows=settings.eval_windows,
        seed=settings.seed,
        log_interval=1,
    )
    say(
        f"\nLoRA fine-tuning on the Folio training plays: {settings.steps} steps of {settings.batch_size} x "
        f"{base.config.block_size} bytes"
    )
    with timed(phases, "train (with its evaluations)", xp):
        result = fit(model, folio, train_settings)
    with timed(phases, "evaluate", xp):
        after = {"folio": result.evals[-1]["val_bits_per_byte"], "modern": bpb(model, modern)}  # loop's last
    say(
        f"Folio: {before['folio']:.4f} -> {after['folio']:.4f} bits/byte (learned); "
        f"modern: {before['modern']:.4f} -> {after['modern']:.4f} (forgotten)"
    )

    with timed(phases, "save adapter", xp):
        adapter_file = save_adapter(model, out_dir / "adapter")
    sizes = {
        "adapter_bytes": adapter_file.stat().st_size,
        "base_file_bytes": Path(base_path).stat().st_size,
        "base_float32_bytes": sum(int(base.params[name].nbytes) for name in base.params),
    }
    say(
        f"adapter on disk: {sizes['adapter_bytes']:,} bytes; the base: {sizes['base_file_bytes']:,} bytes "
        f"(float16), {sizes['base_float32_bytes']:,} in float32"
    )

    with timed(phases, "generate samples", xp):
        samples_after = samples_of(model, settings, decoder(model))
    spelling = {
        "before": folio_spellings_per_1000("".join(samples_before)),
        "after": folio_spellings_per_1000("".join(samples_after)),
        "folio_training_text": folio_spellings_per_1000(
            folio.train[:200_000].tobytes().decode("utf-8", "replace")
        ),
    }
    say(f"\nthe same prompt, seed 0, before:\n{settings.prompt}{samples_before[0][:300]}")
    say(f"\n... and after:\n{settings.prompt}{samples_after[0][:300]}")
    say(
        f"\nFolio spellings ({', '.join(FOLIO_SPELLINGS[:6])}, ...) per 1,000 generated characters: "
        f"{spelling['before']:.2f} before, {spelling['after']:.2f} after "
        f"(the Folio text itself: {spelling['folio_training_text']:.2f})"
    )

    with timed(phases, "merge check", xp):
        idx = folio.val[: base.config.block_size][None, :].astype(np.int64)
        logits_unmerged = to_numpy(model.forward(idx)[0]).astype(np.float64)
        merged = model.merge_and_unload()
        logits_merged = to_numpy(merged.forward(idx)[0]).astype(np.float64)
    merge_error = float(np.max(np.abs(logits_merged - logits_unmerged)) / np.max(np.abs(logits_unmerged)))
    with timed(phases, "time generation", xp):
        timing = {
            "base": time_generation(base, settings, decoder=decoder(base)),
            "lora_unmerged": time_generation(model, settings, decoder=decoder(model)),
            "merged": time_generation(merged, settings, decoder=decoder(merged)),
        }
    say(
        f"\nmerged vs unmerged logits: max relative difference {merge_error:.1e}; "
        f"merged model: {merged.num_parameters():,} parameters, as the base"
    )
    say(
        "generating {} bytes: base {:.3f} s, unmerged adapter {:.3f} s, merged {:.3f} s".format(
            settings.timing_tokens, timing["base"], timing["lora_unmerged"], timing["merged"]
        )
    )

    with timed(phases, "plot", xp):
        plot_loss_curve(
            result.losses,
            [{"step": 0, "val_bits_per_byte": before["folio"]}, *result.evals],  # step 0: the base
            out_dir / "loss_curve.png",
            title=f"LoRA r={settings.lora_config.r} on the Folio plays",
            eval_label="Folio validation (learned)",
            others={
                "modern plays validation (forgotten)": [
                    {"step": 0, "val_bits_per_byte": before["modern"]},
                    {"step": settings.steps, "val_bits_per_byte": after["modern"]},
                ]
            },
        )
    results = {
        "settings": asdict(settings),
        "device": device,
        "base": f"data/{SHIPPED_BASE.name}" if Path(base_path) == SHIPPED_BASE else str(base_path),
        "trainable_params": model.num_parameters(trainable_only=True),
        "all_params": model.num_parameters(),
        "summary": model_summary_line(model),
        "bits_per_byte_before": before,
        "bits_per_byte_after": after,
        "folio_spellings_per_1000_chars": spelling,
        "samples_before": samples_before,
        "samples_after": samples_after,
        "merge_max_relative_logit_difference": merge_error,
        "generation_seconds": timing,
        **sizes,
        "training": result.to_dict(),
        "phase_seconds": phases,
        "wall_seconds": time.perf_counter() - started,
        "provenance": provenance(device, settings.seed),
    }
    atomic_write_bytes(out_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    say(
        f"\nwrote {out_dir / 'results.json'}, {out_dir / 'loss_curve.png'} and {out_dir / 'adapter' / ADAPTER_WEIGHTS} "
        f"in {results['wall_seconds']:.0f} s ("
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
        + ")"
    )
    return results
