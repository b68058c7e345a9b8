"""Experiments that measure what LoRA is good and bad at, on the shipped base model.

Each experiment is a list of fine-tuning runs (``RunSpec``): a method (LoRA with a rank, scaling
and placement, or full fine-tuning), a target corpus, a learning rate and a seed. A run trains on
the target's training split and reports bits per byte on the target's validation split (what was
learned) and on the held-out modern plays (what was forgotten).

Protocol, the same for every experiment:
- learning rate: each method is swept over a small grid with seed 0, and the best rate (lowest
  target bits/byte) is then run with seeds 1 and 2 as well; points are the mean of the three seeds,
  with their min-max spread shown. The sweep selects on the validation split it reports, as such
  ablations usually do, so the numbers are slightly optimistic for every method alike;
- alpha: lora_alpha = 2r, so the scale s = alpha / r = 2 at every rank; except where the scaling
  rule itself is compared: there both use lora_alpha = 16, so s = 16 / r (LoRA) or 16 / sqrt(r)
  (rsLoRA);
- budget: ``steps`` optimiser steps of ``batch_size`` x 256 bytes, AdamW, warmup 20, cosine decay
  to a tenth, no weight decay, evaluation on 64 windows spread over each validation split.

Runs are independent, so ``run_all`` spreads them over worker processes (several runs share one GPU
well, since each is too small to fill it). Results are appended to a JSON-lines file as they finish,
and a rerun skips the runs already there.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..io.data import SHIPPED_BASE

LORA_LRS = (1e-3, 3e-3, 1e-2)
FULL_LRS = (1e-4, 3e-4, 1e-3)
SEEDS = (0, 1, 2)
ALL_LINEAR = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class RunSpec:
    experiment: str
    label: str  # the point this run belongs to, e.g. "r=8" or "full"
    corpus: str
    method: str  # "lora" or "full"
    lr: float
    seed: int
    r: int = 0
    lora_alpha: float = 0.0
    targets: tuple = ("attn.c_attn",)
    use_rslora: bool = False
    base: str = str(SHIPPED_BASE)
    steps: int = 200
    batch_size: int = 16
    eval_windows: int = 64

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def lora_config(self):
        """The LoraConfig of a LoRA run (None for full fine-tuning): the one place it is built from the fields.

        The fields stay flat because they are the rows of runs.jsonl, compared field by field.
        """
        from ..lora.config import LoraConfig

        if self.method == "full":
            return None
        return LoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, target_modules=self.targets, use_rslora=self.use_rslora
        )


def lora_spec(
    experiment, label, corpus, r, targets=ALL_LINEAR, use_rslora=False, alpha=None, **kw
) -> RunSpec:
    return RunSpec(
        experiment,
        label,
        corpus,
        "lora",
        lr=0.0,
        seed=0,
        r=r,
        lora_alpha=float(2 * r if alpha is None else alpha),
        targets=tuple(targets),
        use_rslora=use_rslora,
        **kw,
    )


def full_spec(experiment, corpus, **kw) -> RunSpec:
    return RunSpec(experiment, "full", corpus, "full", lr=0.0, seed=0, **kw)


def sweep(points: list[RunSpec]) -> list[RunSpec]:
    """Seed 0 at every learning rate of each point's method (phase 1 of the protocol)."""
    return [replace(p, lr=lr) for p in points for lr in (FULL_LRS if p.method == "full" else LORA_LRS)]


def experiment_points(name: str, weak_base: str | None = None) -> list[RunSpec]:
    """The points (method settings, learning rate and seed still open) of one experiment."""
    if name == "rank":
        return [lora_spec("rank", f"r={r}", "shakespeare_folio", r) for r in (1, 2, 4, 8, 16, 32, 64)] + [
            full_spec("rank", "shakespeare_folio")
        ]
    if name == "distance":
        return [
            spec
            for corpus in ("shakespeare_folio", "kjv", "devils_dictionary")
            for spec in (lora_spec("distance", "lora r=8", corpus, 8), full_spec("distance", corpus))
        ]
    if name == "placement":  # about 98k trainable parameters each
        placed = [
            ("c_attn r=16", 16, ("attn.c_attn",)),
            ("attn.c_proj r=32", 32, ("attn.c_proj",)),
            ("mlp r=6", 6, ("mlp.c_fc", "mlp.c_proj")),
            ("all r=4", 4, ALL_LINEAR),
        ]
        scaled = [
            lora_spec(
                "placement",
                f"{kind} r={r}",
                "shakespeare_folio",
                r,
                ("attn.c_attn",),
                use_rslora=kind == "rslora",
                alpha=16.0,
            )  # the same alpha, two scalings
            for r in (8, 64, 256)
            for kind in ("alpha/r", "rslora")
        ]
        return [
            lora_spec("placement", label, "shakespeare_folio", r, targets) for label, r, targets in placed
        ] + scaled
    if name == "base":
        bases = [("shipped base", str(SHIPPED_BASE))] + ([("weak base", weak_base)] if weak_base else [])
        return [lora_spec("base", label, "shakespeare_folio", 8, base=path) for label, path in bases]
    raise ValueError(f"unknown experiment {name!r}; choose one of {EXPERIMENTS}")


EXPERIMENTS = ("rank", "distance", "placement", "base")


def run_one(spec: RunSpec, device: str) -> dict:
    """Train one run and measure it; returns the spec's fields and the measurements."""
    from ..io.checkpoint import load_model
    from ..io.data import load_corpus
    from ..jobs.finetune import fit
    from ..lora.model import add_lora
    from ..training.evaluate import bits_per_byte
    from ..training.loop import TrainSettings

    started = time.perf_counter()
    base = load_model(spec.base, device)
    target, modern = load_corpus(spec.corpus), load_corpus("shakespeare_modern")

    def bpb(model, corpus):
        return bits_per_byte(model, corpus.val, batch_size=spec.batch_size, max_windows=spec.eval_windows)

    before, modern_before = (
        bpb(base, target),
        bpb(base, modern),
    )  # before training: full fine-tuning changes base
    lora_config = spec.lora_config()
    model = base if lora_config is None else add_lora(base, lora_config, seed=spec.seed)
    settings = TrainSettings(
        steps=spec.steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        min_lr=spec.lr / 10,
        warmup_steps=20,
        weight_decay=0.0,
        eval_interval=spec.steps,
        eval_windows=spec.eval_windows,
        seed=spec.seed,
        log_interval=spec.steps,
    )
    result = fit(model, target, settings, progress=False)
    return {
        **asdict(spec),
        "target_before": before,
        "target_after": result.evals[-1]["val_bits_per_byte"],
        "modern_before": modern_before,
        "modern_after": bpb(model, modern),
        "trainable_params": model.num_parameters(trainable_only=True),
        "tokens_per_second": result.tokens_per_second,
        "seconds": time.perf_counter() - started,
    }


def _worker(args):
    spec, device = args
    try:
        return run_one(spec, device)
    except Exception as err:  # one failed run must not lose the others; it is reported and retried on rerun
        return {**asdict(spec), "error": f"{type(err).__name__}: {err}"}


def run_all(specs: list[RunSpec], results_path: Path, device: str, workers: int, say=print) -> list[dict]:
    """Run every spec not yet in ``results_path`` (JSON lines), ``workers`` at a time; return all results."""
    done = load_results(results_path)
    finished = {
        RunSpec(**{k: v for k, v in row.items() if k in RunSpec.__dataclass_fields__}).key()
        for row in done
        if "error" not in row
    }
    todo = [spec for spec in specs if spec.key() not in finished]
    say(
        f"{len(specs) - len(todo)} of {len(specs)} runs already done; running {len(todo)} on {device} "
        f"with {workers} workers"
    )
    results_path.parent.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: safe with CUDA
    with context.Pool(workers) as pool, open(results_path, "a") as log:
        for row in pool.imap_unordered(_worker, [(spec, device) for spec in todo]):
            log.write(json.dumps(row) + "\n")
            log.flush()
            status = row.get("error") or f"{row['target_after']:.4f} bits/byte in {row['seconds']:.0f} s"
            say(
                f"  {row['experiment']} {row['label']} {row['corpus']} lr={row['lr']:g} seed={row['seed']}: {status}"
            )
    return [row for row in load_results(results_path) if "error" not in row]


def load_results(path: Path) -> list[dict]:
    """The result rows of a runs.jsonl (none if it is missing); ValueError naming the file and a bad line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = enumerate(path.read_bytes().splitlines(), start=1)
    return [result_row(raw, path, number) for number, raw in lines if raw.strip()]


def result_row(raw: bytes, path: Path, number: int) -> dict:
    """Line ``number`` of the runs.jsonl ``path``: one run's JSON object, else a ValueError naming the line."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{number}: not UTF-8 text (byte offset {err.start} of the line)") from None
    except json.JSONDecodeError as err:
        row, problem = None, f"{err.msg} at offset {err.pos} of the line"
    else:
        problem = f"a JSON {type(row).__name__}"
    if not isinstance(row, dict):
        raise ValueError(
            f"{path}:{number}: not a JSON object ({problem}); each line is one finished run: fix or delete it"
        )
    return row


def best_lr(rows: list[dict], point: RunSpec) -> float:
    """The learning rate of seed 0 with the lowest target bits/byte for a point."""
    candidates = [row for row in rows if _same_point(row, point) and row["seed"] == 0]
    if not candidates:
        raise ValueError(f"no sweep results for {point.experiment} {point.label} {point.corpus}")
    return min(candidates, key=lambda row: row["target_after"])["lr"]


def _same_point(row: dict, point: RunSpec) -> bool:
    """Whether a result row belongs to a point: every setting equal but the learning rate and seed."""

    def plain(value):  # JSON turns tuples into lists
        return list(value) if isinstance(value, tuple) else value

    return all(
        plain(row[name]) == plain(value)
        for name, value in asdict(point).items()
        if name not in ("lr", "seed")
    )


def summarize_point(rows: list[dict], point: RunSpec) -> dict:
    """Mean, min and max over the seeds at the point's best learning rate."""
    lr = best_lr(rows, point)
    runs = [row for row in rows if _same_point(row, point) and row["lr"] == lr]
    summary = {
        "label": point.label,
        "corpus": point.corpus,
        "method": point.method,
        "r": point.r,
        "best_lr": lr,
        "seeds": sorted(row["seed"] for row in runs),
        "trainable_params": runs[0]["trainable_params"],
        "target_before": runs[0]["target_before"],
        "modern_before": runs[0]["modern_before"],
    }
    for measure in ("target_after", "modern_after"):
        values = [row[measure] for row in runs]
        summary[measure] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    summary["forgetting"] = summary["modern_after"]["mean"] - summary["modern_before"]
    summary["sweep"] = {
        row["lr"]: row["target_after"] for row in rows if _same_point(row, point) and row["seed"] == 0
    }
    return summary


WEAK_BASE_STEPS = 300


def make_weak_base(out_dir: Path, device: str, say=print) -> Path:
    """The shipped base's shape pretrained for only WEAK_BASE_STEPS steps (once; reused after)."""
    from ..config import GPTConfig
    from ..io.checkpoint import load_checkpoint
    from ..jobs.pretrain import CHECKPOINT_NAME, pretrain
    from ..training.loop import TrainSettings

    path = out_dir / CHECKPOINT_NAME
    if not path.is_file():
        shipped = load_checkpoint(SHIPPED_BASE).metadata
        settings = TrainSettings(
            **{
                **shipped["settings"],
                "steps": WEAK_BASE_STEPS,
                "warmup_steps": 50,
                "eval_interval": WEAK_BASE_STEPS,
            }
        )
        say(f"pretraining a weak base ({WEAK_BASE_STEPS} steps) into {out_dir}")
        pretrain(
            "shakespeare_modern",
            GPTConfig.from_dict(shipped["config"]),
            settings,
            out_dir,
            device,
            progress=False,
        )
    return path


def run_experiment(
    name: str,
    out_dir,
    device: str,
    workers: int,
    steps: int = 200,
    batch_size: int = 16,
    eval_windows: int = 64,
    weak_base: str | None = None,
    base: str | None = None,
    say=print,
) -> list[dict]:
    """Both phases of the protocol for one experiment; writes <out>/<name>.json and <name>.png.

    ``base`` replaces the shipped base in every run (for quick checks on a small model).
    """
    out_dir = Path(out_dir)
    results_path = out_dir / "runs.jsonl"
    if name == "base" and weak_base is None:
        weak_base = str(make_weak_base(out_dir / "weak_base", device, say))
    points = [
        replace(p, steps=steps, batch_size=batch_size, eval_windows=eval_windows)
        for p in experiment_points(name, weak_base)
    ]
    if base is not None:
        points = [p if p.label == "weak base" else replace(p, base=str(base)) for p in points]
    rows = run_all(sweep(points), results_path, device, workers, say)
    seeds = [replace(p, lr=best_lr(rows, p), seed=seed) for p in points for seed in SEEDS[1:]]
    rows = run_all(seeds, results_path, device, workers, say)
    return write_summary(name, points, rows, out_dir)


def summarize_only(
    name: str, out_dir, steps: int = 200, batch_size: int = 16, eval_windows: int = 64
) -> list[dict]:
    """Rebuild <name>.json and <name>.png from runs.jsonl alone (no training, no weak-base pretraining)."""
    out_dir = Path(out_dir)
    rows = [row for row in load_results(out_dir / "runs.jsonl") if "error" not in row]
    weak = next((row["base"] for row in rows if row["label"] == "weak base"), None)
    points = [
        replace(p, steps=steps, batch_size=batch_size, eval_windows=eval_windows)
        for p in experiment_points(name, weak)
    ]
    return write_summary(name, points, rows, out_dir)


def write_summary(name: str, points: list[RunSpec], rows: list[dict], out_dir: Path) -> list[dict]:
    """<out>/<name>.json and <name>.png from the result rows of an experiment's points."""
    from .experiment_plots import plot_experiment

    summary = [summarize_point(rows, p) for p in points]
    document = {
        "experiment": name,
        "protocol": __doc__.split("Protocol, the same for every experiment:")[1].strip(),
        "device": sorted({row.get("device", "cuda") for row in rows}),
        "steps": points[0].steps,
        "batch_size": points[0].batch_size,
        "points": summary,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    plot_experiment(name, summary, out_dir / f"{name}.png")
    return summary
