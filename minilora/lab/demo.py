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
    demo = DemoRun(out_dir, resolve_device(device), settings, say, fast_generation)
    base, folio, modern = demo.load(base_path)
    before, samples_before = demo.measure_base(base, base_path, folio, modern)
    model = demo.add_adapter(base)
    training, after = demo.train(model, folio, modern, before)
    sizes = demo.save_adapter(model, base, base_path)
    samples_after, spelling = demo.compare_samples(model, folio, samples_before)
    merged, merge_error = demo.check_merge(model, folio)
    timing = demo.time_generations(base, model, merged)
    demo.plot(training, before, after)
    return demo.write_results(
        {
            "settings": asdict(settings),
            "device": demo.device,
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
            "training": training.to_dict(),
        }
    )


def demo_train_settings(settings: DemoSettings) -> TrainSettings:
    """The LoRA training run of the demo: warmup, then cosine decay to a tenth, two evaluations."""
    return TrainSettings(
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


class DemoRun:
    """One run of the demo, phase by phase: where it prints and writes, and the seconds each phase took."""

    def __init__(self, out_dir, device: str, settings: DemoSettings, say, fast_generation: bool):
        self.started = time.perf_counter()
        self.out_dir, self.device, self.settings, self.say = Path(out_dir), device, settings, say
        self.fast_generation = fast_generation
        self.phases = {}  # seconds per phase of the demo, reported in results.json
        self.xp = np  # the device's array module, once the base is loaded

    def timed(self, name: str):
        """Add the seconds the ``with`` block takes to the phase ``name``."""
        return timed(self.phases, name, self.xp)

    def decoder(self, model):
        """The generation decoder for ``model``: the device's fast one, or the reference."""
        return accelerate_generation(model) if self.fast_generation else generate_ids

    def bits_per_byte(self, model, corpus) -> float:
        """``model``'s bits per byte on ``corpus``'s validation split, on the demo's windows."""
        settings = self.settings
        return bits_per_byte(
            model, corpus.val, batch_size=settings.batch_size, max_windows=settings.eval_windows
        )

    def load(self, base_path):
        """The base model, on the device with its fast layer functions, and the Folio and modern corpora."""
        with self.timed("load"):
            base = load_model(base_path, self.device)
            base.ops = fast_ops(
                base.xp
            )  # the device's fast layer functions, as training hands the adapted model
            folio, modern = load_corpus("shakespeare_folio"), load_corpus("shakespeare_modern")
        self.xp = base.xp
        return base, folio, modern

    def measure_base(self, base, base_path, folio, modern) -> tuple[dict, list[str]]:
        """The base's bits per byte on both held-out sets, and its samples: the starting point."""
        name = base_path.name if isinstance(base_path, Path) else base_path
        self.say(f"base model: {name}, {base.num_parameters():,} parameters, on {self.device}")
        with self.timed("evaluate"):
            before = {"folio": self.bits_per_byte(base, folio), "modern": self.bits_per_byte(base, modern)}
        self.say(
            f"held-out Folio plays (Hamlet, Macbeth, The Tempest): {before['folio']:.4f} bits/byte; "
            f"the same plays in modern spelling: {before['modern']:.4f}"
        )
        with self.timed("generate samples"):
            samples = samples_of(base, self.settings, self.decoder(base))
        return before, samples

    def add_adapter(self, base):
        """The base with the demo's LoRA adapter, its parameter table and summary printed."""
        lora_config = self.settings.lora_config
        with self.timed("add adapter"):
            model = add_lora(base, lora_config, seed=self.settings.seed)
        self.say("\n" + format_table(lora_parameter_table(lora_config, base.config)))
        self.say(model_summary_line(model))
        return model

    def train(self, model, folio, modern, before: dict):
        """Train the adapter on the Folio plays; returns the TrainResult and the bits per byte after."""
        settings = self.settings
        self.say(
            f"\nLoRA fine-tuning on the Folio training plays: {settings.steps} steps of {settings.batch_size} x "
            f"{model.config.block_size} bytes"
        )
        with self.timed("train (with its evaluations)"):
            result = fit(model, folio, demo_train_settings(settings))
        with self.timed("evaluate"):
            # the Folio's from the loop's last evaluation
            after = {
                "folio": result.evals[-1]["val_bits_per_byte"],
                "modern": self.bits_per_byte(model, modern),
            }
        self.say(
            f"Folio: {before['folio']:.4f} -> {after['folio']:.4f} bits/byte (learned); "
            f"modern: {before['modern']:.4f} -> {after['modern']:.4f} (forgotten)"
        )
        return result, after

    def save_adapter(self, model, base, base_path) -> dict:
        """Write the adapter into ``<out>/adapter``; returns its size against the base's, on disk and in memory."""
        with self.timed("save adapter"):
            adapter_file = save_adapter(model, self.out_dir / "adapter")
        sizes = {
            "adapter_bytes": adapter_file.stat().st_size,
            "base_file_bytes": Path(base_path).stat().st_size,
            "base_float32_bytes": sum(int(base.params[name].nbytes) for name in base.params),
        }
        self.say(
            f"adapter on disk: {sizes['adapter_bytes']:,} bytes; the base: {sizes['base_file_bytes']:,} bytes "
            f"(float16), {sizes['base_float32_bytes']:,} in float32"
        )
        return sizes

    def compare_samples(self, model, folio, samples_before: list[str]) -> tuple[list[str], dict]:
        """The adapted model's samples, and the Folio spellings per 1,000 characters before, after and in the Folio."""
        settings = self.settings
        with self.timed("generate samples"):
            samples_after = samples_of(model, settings, self.decoder(model))
        spelling = {
            "before": folio_spellings_per_1000("".join(samples_before)),
            "after": folio_spellings_per_1000("".join(samples_after)),
            "folio_training_text": folio_spellings_per_1000(
                folio.train[:200_000].tobytes().decode("utf-8", "replace")
            ),
        }
        self.say(f"\nthe same prompt, seed 0, before:\n{settings.prompt}{samples_before[0][:300]}")
        self.say(f"\n... and after:\n{settings.prompt}{samples_after[0][:300]}")
        self.say(
            f"\nFolio spellings ({', '.join(FOLIO_SPELLINGS[:6])}, ...) per 1,000 generated characters: "
            f"{spelling['before']:.2f} before, {spelling['after']:.2f} after "
            f"(the Folio text itself: {spelling['folio_training_text']:.2f})"
        )
        return samples_after, spelling

    def check_merge(self, model, folio):
        """The adapter merged into a plain model, and the largest relative difference of its logits from ``model``'s."""
        with self.timed("merge check"):
            idx = folio.val[: model.config.block_size][None, :].astype(np.int64)
            logits_unmerged = to_numpy(model.forward(idx)[0]).astype(np.float64)
            merged = model.merge_and_unload()
            logits_merged = to_numpy(merged.forward(idx)[0]).astype(np.float64)
        merge_error = float(np.max(np.abs(logits_merged - logits_unmerged)) / np.max(np.abs(logits_unmerged)))
        self.say(
            f"\nmerged vs unmerged logits: max relative difference {merge_error:.1e}; "
            f"merged model: {merged.num_parameters():,} parameters, as the base"
        )
        return merged, merge_error

    def time_generations(self, base, model, merged) -> dict:
        """Seconds to generate with the base, the unmerged adapter and the merged model (as fast as the base)."""
        settings = self.settings
        with self.timed("time generation"):
            timing = {
                "base": time_generation(base, settings, decoder=self.decoder(base)),
                "lora_unmerged": time_generation(model, settings, decoder=self.decoder(model)),
                "merged": time_generation(merged, settings, decoder=self.decoder(merged)),
            }
        self.say(
            "generating {} bytes: base {:.3f} s, unmerged adapter {:.3f} s, merged {:.3f} s".format(
                settings.timing_tokens, timing["base"], timing["lora_unmerged"], timing["merged"]
            )
        )
        return timing

    def plot(self, training, before: dict, after: dict) -> None:
        """loss_curve.png: the training loss, the Folio validation from step 0 (the base), and the forgetting."""
        settings = self.settings
        with self.timed("plot"):
            plot_loss_curve(
                training.losses,
                [{"step": 0, "val_bits_per_byte": before["folio"]}, *training.evals],  # step 0: the base
                self.out_dir / "loss_curve.png",
                title=f"LoRA r={settings.lora_config.r} on the Folio plays",
                eval_label="Folio validation (learned)",
                others={
                    "modern plays validation (forgotten)": [
                        {"step": 0, "val_bits_per_byte": before["modern"]},
                        {"step": settings.steps, "val_bits_per_byte": after["modern"]},
                    ]
                },
            )

    def write_results(self, results: dict) -> dict:
        """results.json: ``results`` with the phases' seconds, the wall time and the provenance; returns it."""
        results = {
            **results,
            "phase_seconds": self.phases,
            "wall_seconds": time.perf_counter() - self.started,
            "provenance": provenance(self.device, self.settings.seed),
        }
        atomic_write_bytes(self.out_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
        out = self.out_dir
        written = f"{out / 'results.json'}, {out / 'loss_curve.png'} and {out / 'adapter' / ADAPTER_WEIGHTS}"
        phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        self.say(f"\nwrote {written} in {results['wall_seconds']:.0f} s ({phases})")
        return results
