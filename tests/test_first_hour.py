"""A new user's first hour (issue 32): the commands work as the README writes them, and say what they do.

- ``finetune --base smollm2`` adapts the family's own modules (q_proj, v_proj) and evaluates on the
  family's CPU-friendly number of windows; targets that match nothing are refused with the modules
  summarised as a pattern, in one short line;
- every command that needs the llm extra names it in one line when its modules are missing;
- an evaluation says what it scores, flushed before it starts, and shows a progress bar; the training
  bar shows the batch's bits per byte, converted as the validation's are;
- a warm-up not shorter than the run is refused, and the default one is fitted to a short run;
- one flag name per idea across commands (the old names still parse), and ``minilora --version``;
- the notebooks set their own kernel's BLAS threads;
- ``minilora info`` reads every kind of file minilora writes.

SmolLM2 is stood in for by a tiny random Llama (``tiny_smollm2``) behind ``--base smollm2``: these
tests check what the command line does with the family, not the real weights (tests/test_smollm2_*.py
and the README's own run, tests/test_readme_snippets.py, use those).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minilora.backend import host_rng
from minilora.cli import main, parse_arguments
from minilora.config import get_preset
from minilora.io import bases
from minilora.io.bases import Base
from minilora.io.checkpoint import save_checkpoint
from minilora.io.data import Corpus
from minilora.io.tokenizer import ByteTokenizer
from minilora.llama import Llama, LlamaConfig, init_llama_params
from minilora.lora.config import LoraConfig, select_target_modules
from minilora.model import init_params
from minilora.optim import AdamW
from minilora.quant import quantize_weight
from minilora.training.batches import get_batch
from minilora.training.loop import DATA_STREAM, TrainSettings, train_loop
from minilora.version import __version__

REPO = Path(__file__).resolve().parent.parent
LLAMA = LlamaConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, ffn_hidden=64, vocab_size=256, block_size=16)
GPT = get_preset("tiny", n_layer=1, n_embd=16, block_size=16)
SHORT_RUN = ["--corpus", "shakespeare_folio", "--steps", "2", "--batch-size", "2", "--warmup-steps", "0"]
LLM_EXTRA = "needs the llm extra: pip install 'minilora[llm]'"


def run(argv) -> tuple[int, str, str]:
    """main(argv) with its output captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def tiny_smollm2(spec=None, device=None, block_size=None, quantized=None) -> Base:
    """``load_base("smollm2", ...)`` at a toy's size: a random Llama, byte-level, the same on every call."""
    params = init_llama_params(LLAMA, seed=0)
    if quantized is not None:  # QLoRA's frozen matrices in blocks (stored as (C_out, C_in))
        for module in LLAMA.linear_modules():
            params[f"{module}.weight"] = quantize_weight(params[f"{module}.weight"].T, quantized, "linear")
    return Base("smollm2", Llama(LLAMA, params), ByteTokenizer())


@pytest.fixture(scope="module")
def fake_smollm2():
    """``--base smollm2`` loads ``tiny_smollm2`` wherever a command loads its base; other bases load as ever."""

    real = bases.load_base

    def load_base(spec=None, *args, **kwargs):
        return (tiny_smollm2 if spec == "smollm2" else real)(spec, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("minilora.jobs.finetune.load_base", load_base)
        patch.setattr("minilora.io.bases.load_base", load_base)
        yield


@pytest.fixture(scope="module")
def gpt_base(tmp_path_factory) -> Path:
    """A one-block byte-level GPT checkpoint, as pretrain writes one."""
    path = tmp_path_factory.mktemp("gpt") / "base.safetensors"
    save_checkpoint(path, init_params(GPT, seed=0), {"kind": "pretrain", "config": GPT.to_dict()})
    return path


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, fake_smollm2) -> Path:
    """``minilora finetune --base smollm2`` as the README writes it (no --targets, no --eval-windows), shortened."""
    out = tmp_path_factory.mktemp("devil")
    code, _, err = run(["finetune", "--base", "smollm2", *SHORT_RUN, "--quiet", "--out", str(out)])
    assert code == 0, err
    return out


def test_finetune_on_smollm2_adapts_the_llama_familys_default_targets(llama_run):
    document = json.loads((llama_run / "adapter_config.json").read_text())
    assert document["lora_config"]["target_modules"] == ["q_proj", "v_proj"]
    assert sorted(document["adapted_modules"]) == [
        f"model.layers.{i}.self_attn.{m}_proj" for i in range(LLAMA.n_layer) for m in ("q", "v")
    ]


def test_finetune_on_smollm2_evaluates_the_familys_eight_windows(llama_run):
    metrics = json.loads((llama_run / "finetune_metrics.json").read_text())
    assert metrics["settings"]["eval_windows"] == LlamaConfig.default_eval_windows == 8


def test_targets_that_match_nothing_are_summarised_as_a_pattern_in_one_short_line():
    smollm2_shape = LlamaConfig(n_layer=30, n_head=3, n_kv_head=1, n_embd=12, ffn_hidden=16, vocab_size=8)
    with pytest.raises(ValueError) as refused:
        select_target_modules(LoraConfig(target_modules=("c_attn",)), smollm2_shape)
    message = str(refused.value)
    assert (
        "blocks 0-29 x {self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, " in message
    )
    assert "mlp.gate_proj, mlp.up_proj, mlp.down_proj}" in message and "\n" not in message
    assert len(message) < 300, message  # it was 6.8 KB: 210 module names


def test_every_command_that_needs_the_llm_extra_names_it_in_one_line(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    folders = {name: str(tmp_path / name) for name in ("run", "adapter", "merged", "peft", "imported")}
    commands = [
        ["finetune", "--base", "smollm2", "--out", folders["run"]],
        ["finetune", "--base", "smollm2", "--quantized", "nf4", "--out", folders["run"] + "_nf4"],
        ["eval", "--base", "smollm2"],
        ["generate", "--base", "smollm2"],
        ["chat", "--message", "hello"],
        ["merge", "--base", "smollm2", "--adapter", folders["adapter"], "--out", folders["merged"]],
        ["export-peft", "--base", "smollm2", "--adapter", folders["adapter"], "--out", folders["peft"]],
        ["import-peft", "--base", "smollm2", "--peft", folders["peft"], "--out", folders["imported"]],
        ["bench", "--preset", "smollm2", "--steps", "1"],
        ["info", str(tmp_path / "model.gguf")],
    ]
    script = (
        "import json, sys\n"
        "sys.modules['regex'] = sys.modules['gguf'] = None  # the llm extra's modules: not installed\n"
        "from minilora.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    print(main(argv), flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True, cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stdout.split() == ["1"] * len(commands), done.stdout
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    for argv, line in zip(commands, errors, strict=True):
        assert line.startswith(f"minilora {argv[0]}: error: {LLM_EXTRA} (no module named "), line


class Recorder:
    """Stand-ins for stdout and stderr that record, in one list, what was written and when stdout was flushed."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def stream(self, name: str) -> io.StringIO:
        events = self.events

        class Stream(io.StringIO):
            def write(self, text):
                events.append((name, text))
                return len(text)

            def flush(self):
                events.append((name, "<flush>"))

        return Stream()


def test_each_evaluation_is_announced_flushed_before_it_starts_and_shows_a_progress_bar(gpt_base, tmp_path):
    recorder = Recorder()
    argv = ["finetune", "--base", str(gpt_base), *SHORT_RUN, "--eval-windows", "2", "--out", str(tmp_path)]
    with (
        contextlib.redirect_stdout(recorder.stream("out")),
        contextlib.redirect_stderr(recorder.stream("err")),
    ):
        assert main(argv) == 0
    events = recorder.events
    announced = [i for i, (name, text) in enumerate(events) if name == "out" and "evaluating val" in text]
    said = ["".join(text for _, text in events[i : i + 2]).strip() for i in announced]
    assert said == ["before training: evaluating val: 2 windows of 16 tokens",
                    "step 2: evaluating val: 2 windows of 16 tokens"]  # fmt: skip
    for i in announced:
        bar = next(j for j in range(i, len(events)) if events[j][0] == "err" and "eval:" in events[j][1])
        assert ("out", "<flush>") in events[i:bar], "the line waits in a buffer while the evaluation runs"


def test_the_training_bar_shows_the_batchs_bits_per_byte_as_validation_computes_them(capsys):
    rng = np.random.default_rng(0)
    token_bytes = rng.integers(1, 5, LLAMA.vocab_size)  # a subword vocabulary: 1 to 4 bytes a token
    corpus = Corpus("ids", rng.integers(0, 256, 400).astype(np.int32), rng.integers(0, 256, 100).astype(np.int32),
                    token_bytes)  # fmt: skip
    model = Llama(LLAMA, init_llama_params(LLAMA, seed=0))
    settings = TrainSettings(
        steps=2, batch_size=2, warmup_steps=0, eval_interval=2, eval_windows=1, log_interval=1
    )
    optimizer = AdamW(model.params, model.trainable_names, lr=settings.lr)
    result = train_loop(model, optimizer, corpus, settings, progress=True)
    bar = capsys.readouterr().err
    for logged in result.losses:
        _, y = get_batch(
            corpus.train, 2, LLAMA.block_size, host_rng(settings.seed, DATA_STREAM, logged["step"] - 1)
        )
        expected = logged["loss"] * y.size / token_bytes[y].sum() / math.log(2)  # nats/token -> bits/byte
        assert logged["bits_per_byte"] == pytest.approx(expected, rel=1e-12)
    assert f"bits/byte={result.losses[-1]['bits_per_byte']:.4f}" in bar and "loss=" not in bar


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_warmup_not_shorter_than_the_run_is_refused_naming_both_flags(command, tmp_path):
    argv = [
        command,
        "--corpus",
        "shakespeare_folio",
        "--steps",
        "3",
        "--warmup-steps",
        "3",
        "--out",
        str(tmp_path),
    ]
    code, _, err = run(argv)
    assert code == 1
    assert err == (
        f"minilora {command}: error: --warmup-steps 3 is not shorter than --steps 3: the learning rate "
        "would never reach --lr; give --warmup-steps below 3\n"
    )


def test_the_default_warmup_is_cut_to_a_tenth_of_a_run_it_would_outlast(gpt_base, tmp_path):
    argv = ["finetune", "--base", str(gpt_base), "--corpus", "shakespeare_folio", "--steps", "12", "--batch-size",
            "2", "--eval-windows", "1", "--eval-interval", "12", "--quiet", "--out", str(tmp_path)]  # fmt: skip
    assert run(argv)[0] == 0
    assert json.loads((tmp_path / "finetune_metrics.json").read_text())["settings"]["warmup_steps"] == 1


def test_one_flag_name_per_idea_and_the_old_names_still_parse(capsys):
    for flag in ("--eval-windows", "--max-windows"):
        assert parse_arguments(["eval", flag, "3"]).eval_windows == 3
    for flag in ("--warmup-steps", "--warmup"):
        assert parse_arguments(["bench", flag, "3"]).warmup == 3
    for command, old in (("eval", "--max-windows"), ("bench", "--warmup")):
        with pytest.raises(SystemExit):
            parse_arguments([command, "--help"])
        assert f"(old name: {old})" in " ".join(capsys.readouterr().out.split())


def test_minilora_version_prints_the_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"minilora {__version__}\n"


def test_every_notebook_sets_its_kernels_blas_threads_in_its_imports_cell():
    jupytext = pytest.importorskip(
        "jupytext", reason="needs the notebooks extra: pip install -e '.[notebooks]'"
    )

    for source in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py")):
        imports = [cell.source for cell in jupytext.read(source).cells if cell.cell_type == "code"][1]
        assert "blas_threads = use_one_blas_thread()" in imports, source.name


def test_use_one_blas_thread_leaves_blas_one_thread_in_a_fresh_kernel():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    script = (
        "import numpy\n"
        "from threadpoolctl import threadpool_info\n"
        "from minilora.fast.cpu.inference import use_one_blas_thread\n"
        "print(use_one_blas_thread(), [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(maxsplit=1) == ["1", "[1]\n"]


def write_tiny_gguf(path: Path) -> None:
    """A llama GGUF file of two small tensors and the metadata minilora reads."""
    gguf = pytest.importorskip("gguf", reason="needs the llm extra: pip install -e '.[llm]'")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    shape = {"block_count": 1, "embedding_length": 8, "attention.head_count": 2, "attention.head_count_kv": 1,
             "feed_forward_length": 16, "context_length": 32}  # fmt: skip
    for key, value in shape.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(4)])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, gpt_base, llama_run, fake_smollm2) -> dict[str, tuple[Path, list[str]]]:
    """Every kind of file minilora writes, small, with what ``info`` must say of each."""
    root = tmp_path_factory.mktemp("artifacts")
    gpt_run, full_run, qlora_run = root / "gpt_run", root / "full_run", root / "qlora_run"
    for argv in (
        ["finetune", "--base", str(gpt_base), *SHORT_RUN, "--quiet", "--out", str(gpt_run)],
        ["finetune", "--base", str(gpt_base), *SHORT_RUN, "--full", "--quiet", "--out", str(full_run)],
        [
            "finetune",
            "--base",
            "smollm2",
            "--quantized",
            "q8_0",
            *SHORT_RUN,
            "--quiet",
            "--out",
            str(qlora_run),
        ],
        [
            "merge",
            "--base",
            str(gpt_base),
            "--adapter",
            str(gpt_run),
            "--out",
            str(root / "merged.safetensors"),
        ],
        ["export-peft", "--base", str(gpt_base), "--adapter", str(gpt_run), "--out", str(root / "peft")],
        ["merge", "--base", "smollm2", "--adapter", str(llama_run), "--out", str(root / "hf")],
    ):
        code, _, err = run(argv)
        assert code == 0, f"{argv}: {err}"
    write_tiny_gguf(root / "tiny.gguf")
    return {
        "GPT checkpoint": (gpt_base, ["kind: pretrain", "config (gpt)"]),
        "GPT LoRA run": (gpt_run, ["adapter ", "base (gpt)", "run: lora fine-tuning of"]),
        "GPT full fine-tune": (full_run, ["kind: finetune", "mode: full"]),
        "merged GPT": (root / "merged.safetensors", ["kind: merged"]),
        "SmolLM2 LoRA run": (llama_run, ["base (llama)", "model.layers.1.self_attn.v_proj", "run: lora"]),
        "SmolLM2 run state": (llama_run / "finetune_state.safetensors", ["mode: lora", "config (llama)"]),
        "QLoRA run": (qlora_run, ["base (llama)", "held q8_0"]),
        "PEFT folder": (root / "peft", ["PEFT adapter", "peft_type=LORA", "1 adapted modules"]),
        "merged HF folder": (
            root / "hf",
            ["Hugging Face checkpoint", "model_type=llama", "num_hidden_layers=2"],
        ),
        "GGUF file": (root / "tiny.gguf", ["GGUF file", "'n_layer': 1", "2 tensors"]),
    }


def test_info_reads_every_kind_of_file_minilora_writes(artifacts):
    failures = []
    for kind, (path, expected) in artifacts.items():
        code, printed, err = run(["info", str(path)])
        missing = [text for text in expected if text not in printed]
        if code != 0 or missing:
            failures.append(f"{kind} ({path.name}): exit {code}, missing {missing}; {err.strip()}")
    assert not failures, "\n".join(failures)
