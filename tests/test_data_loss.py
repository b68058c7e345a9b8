"""No command deletes or overwrites what it reads or what it did not write.

Checked here: an --out that is, or holds, an input of the same command is refused before anything is
touched; --overwrite (--force, its old name) replaces only a result minilora's same command wrote,
and only once the new one is complete; merge and import-peft refuse an existing result without it;
training keeps the previous checkpoint beside the current one and stops, keeping the best one, when
its validation value blows up while staying finite; a kill in the middle of writing a Hugging Face
folder leaves the old folder whole.
"""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import minilora.io.data
import minilora.jobs.pretrain
from minilora.cli import main, parse_arguments
from minilora.config import GPTConfig
from minilora.io.checkpoint import load_checkpoint, save_checkpoint
from minilora.io.peft import export_peft
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params

MICRO = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
PRETRAIN_FLAGS = [
    *("--preset", "tiny", "--n-layer", "1", "--n-embd", "16", "--block-size", "16", "--batch-size", "4"),
    *("--eval-interval", "4", "--eval-windows", "4", "--warmup-steps", "2", "--quiet"),
]
FINETUNE_FLAGS = [
    *("--corpus", "shakespeare_folio", "--steps", "8", "--eval-interval", "4", "--eval-windows", "4"),
    *("--batch-size", "4", "--warmup-steps", "1", "--r", "2", "--quiet"),
]
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(80))


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def contents(folder: Path) -> dict:
    """Every file under ``folder`` (relative name -> bytes): what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_base(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        folder / "checkpoint.safetensors", init_params(MICRO, seed=0), {"config": MICRO.to_dict()}
    )
    return folder


def pretrain_into(out: Path, steps: int = 8, *extra: str) -> int:
    return main(["pretrain", *PRETRAIN_FLAGS, "--corpus", "devils_dictionary", "--steps", str(steps),
                 *extra, "--out", str(out)])  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def trained_run(base_dir, tmp_path_factory):
    """A finetune run folder (a trained adapter beside its state), saved at steps 4 and 8."""
    out = tmp_path_factory.mktemp("run")
    assert main(["finetune", "--base", str(base_dir), *FINETUNE_FLAGS, "--out", str(out)]) == 0
    return out


@pytest.fixture
def peft_dir(base_dir, tmp_path):
    model = GPT(MICRO, dict(load_checkpoint(base_dir / "checkpoint.safetensors").params))
    lora = add_lora(model, LoraConfig(r=2, lora_alpha=4.0, target_modules=("c_attn",), init="random"), seed=1)
    export_peft(lora, tmp_path / "peft")
    return tmp_path / "peft"


# 1. An --out that is, or holds, an input is refused before anything is touched.


def test_finetune_overwrite_into_its_own_base_folder_is_refused_and_the_base_survives(tmp_path, capsys):
    base = make_base(tmp_path / "pretrained")
    before = contents(base)
    argv = ["finetune", "--base", str(base), *FINETUNE_FLAGS, "--out", str(base), "--overwrite"]
    assert main(argv) == 1
    (line,) = error_lines(capsys)
    assert f"--out {base} holds the --base input {base / 'checkpoint.safetensors'}" in line
    assert contents(base) == before


def input_as_output_cases(tmp_path, base_dir, trained_run, peft_dir):
    """(argv, the --out, the input it is or holds, that input's flag) for each command that reads and writes."""
    corpus_folder = tmp_path / "texts"
    corpus_folder.mkdir()
    (corpus_folder / "mine.txt").write_text(TEXT)
    corpus = str(corpus_folder / "mine.txt")
    base_file = tmp_path / "base.safetensors"  # a copy, so that what merge must not touch is in tmp_path
    shutil.copy(base_dir / "checkpoint.safetensors", base_file)
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run, adapter)
    return {
        "pretrain": (
            ["pretrain", *PRETRAIN_FLAGS, "--steps", "4", "--corpus", corpus],
            corpus_folder,
            corpus,
            "--corpus",
        ),
        "finetune": (
            ["finetune", "--base", str(base_dir), *FINETUNE_FLAGS, "--corpus", corpus],
            corpus_folder,
            corpus,
            "--corpus",
        ),
        "merge": (
            ["merge", "--base", str(base_file), "--adapter", str(adapter)],
            base_file,
            base_file,
            "--base",
        ),
        "export-peft": (
            ["export-peft", "--base", str(base_dir), "--adapter", str(adapter)],
            adapter,
            adapter,
            "--adapter",
        ),
        "import-peft": (
            ["import-peft", "--base", str(base_dir), "--peft", str(peft_dir)],
            peft_dir,
            peft_dir,
            "--peft",
        ),
    }


@pytest.mark.parametrize("command", ["pretrain", "finetune", "merge", "export-peft", "import-peft"])
def test_an_output_that_is_or_holds_an_input_is_refused_naming_both(
    command, tmp_path, base_dir, trained_run, peft_dir, capsys
):
    argv, out, read, flag = input_as_output_cases(tmp_path, base_dir, trained_run, peft_dir)[command]
    before = contents(tmp_path)
    assert main([*argv, "--out", str(out)]) == 1
    (line,) = error_lines(capsys)
    assert f"--out {out}" in line and f"the {flag} input {read}" in line
    assert contents(tmp_path) == before


# 2. --overwrite replaces only what minilora's same command wrote, once the new result is complete.


def test_merge_never_replaces_a_pretraining_checkpoint_even_with_overwrite(
    base_dir, trained_run, tmp_path, capsys
):
    assert pretrain_into(tmp_path / "pre") == 0
    checkpoint = tmp_path / "pre" / "checkpoint.safetensors"
    before = contents(tmp_path / "pre")
    capsys.readouterr()
    merge = ["merge", "--base", str(base_dir), "--adapter", str(trained_run), "--out", str(checkpoint)]
    for flags in ([], ["--overwrite"]):
        assert main([*merge, *flags]) == 1
        (line,) = error_lines(capsys)
        assert f"{checkpoint} is a 'pretrain' checkpoint, not one minilora merge wrote" in line
    assert contents(tmp_path / "pre") == before
    assert load_checkpoint(checkpoint).optimizer is not None  # it can still resume


def test_merge_never_writes_over_a_users_json_beside_its_output(base_dir, trained_run, tmp_path, capsys):
    mine = tmp_path / "x.json"
    mine.write_text('{"my": "notes"}\n')
    merge = [
        "merge",
        "--base",
        str(base_dir),
        "--adapter",
        str(trained_run),
        "--out",
        str(tmp_path / "x.safetensors"),
    ]
    for flags in ([], ["--overwrite"]):
        assert main([*merge, *flags]) == 1
        (line,) = error_lines(capsys)
        assert f"would take {mine} as its JSON sidecar, a file minilora merge did not write" in line
    assert mine.read_text() == '{"my": "notes"}\n' and not (tmp_path / "x.safetensors").exists()


def test_merge_replaces_its_own_result_only_with_overwrite_or_its_old_name_force(
    base_dir, trained_run, tmp_path, capsys
):
    out = tmp_path / "merged.safetensors"
    merge = ["merge", "--base", str(base_dir), "--adapter", str(trained_run), "--out", str(out)]
    assert main(merge) == 0
    capsys.readouterr()
    assert main(merge) == 1
    (line,) = error_lines(capsys)
    assert f"{out} holds the result of an earlier minilora merge" in line and "--overwrite" in line
    assert main([*merge, "--overwrite"]) == 0 and main([*merge, "--force"]) == 0
    assert load_checkpoint(out).metadata["kind"] == "merged"
    assert parse_arguments([*merge, "--force"]).overwrite is True
    assert (
        parse_arguments(["assignment", "release", "a1", "--out", str(tmp_path), "--force"]).overwrite is True
    )


def test_import_peft_never_replaces_a_trained_adapter(trained_run, base_dir, peft_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = contents(run)
    imported = ["import-peft", "--base", str(base_dir), "--peft", str(peft_dir), "--out", str(run)]
    for flags in ([], ["--overwrite"]):
        assert main([*imported, *flags]) == 1
        (line,) = error_lines(capsys)
        assert (
            f"{run} holds files minilora import-peft did not write" in line and "adapter.safetensors" in line
        )
    assert contents(run) == before


def test_import_peft_replaces_its_own_result_only_with_overwrite(base_dir, peft_dir, tmp_path, capsys):
    out = tmp_path / "imported"
    imported = ["import-peft", "--base", str(base_dir), "--peft", str(peft_dir), "--out", str(out)]
    assert main(imported) == 0
    before = contents(out)
    capsys.readouterr()
    assert main(imported) == 1
    (line,) = error_lines(capsys)
    assert f"{out} holds the result of an earlier minilora import-peft" in line and "--overwrite" in line
    assert contents(out) == before
    assert main([*imported, "--overwrite"]) == 0
    assert (out / "adapter.safetensors").read_bytes() == before[
        "adapter.safetensors"
    ]  # the same import again


def test_export_peft_never_replaces_a_peft_folder_it_did_not_write(
    base_dir, trained_run, peft_dir, tmp_path, capsys
):
    theirs = tmp_path / "theirs"  # what PEFT's save_pretrained writes: the same two names, no manifest
    theirs.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(peft_dir / name, theirs / name)
    before = contents(theirs)
    export = ["export-peft", "--base", str(base_dir), "--adapter", str(trained_run), "--out", str(theirs)]
    assert main([*export, "--overwrite"]) == 1
    (line,) = error_lines(capsys)
    assert f"{theirs} holds files minilora export-peft did not write" in line
    assert contents(theirs) == before


def test_pretrain_overwrite_never_replaces_a_folder_holding_files_minilora_did_not_write(tmp_path, capsys):
    assert pretrain_into(tmp_path, 4) == 0
    (tmp_path / "notes.txt").write_text("mine")
    before = contents(tmp_path)
    capsys.readouterr()
    assert pretrain_into(tmp_path, 4, "--seed", "1", "--overwrite") == 1
    (line,) = error_lines(capsys)
    assert str(tmp_path) in line and "notes.txt" in line and "--overwrite replaces only a run folder" in line
    assert contents(tmp_path) == before


def test_pretrain_overwrite_keeps_the_old_run_until_the_new_one_is_complete(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert pretrain_into(out, 4) == 0
    before = contents(out)
    real_save = minilora.jobs.pretrain.save_checkpoint

    def save_then_die(path, params, metadata, optimizer_state=None):
        real_save(path, params, metadata, optimizer_state)
        raise KeyboardInterrupt  # the replacing run dies right after its first checkpoint

    monkeypatch.setattr(minilora.jobs.pretrain, "save_checkpoint", save_then_die)
    assert pretrain_into(out, 4, "--seed", "1", "--overwrite") == 130
    assert contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left beside it
    monkeypatch.undo()
    assert pretrain_into(out, 4, "--seed", "1", "--overwrite") == 0
    assert contents(out)["checkpoint.safetensors"] != before["checkpoint.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# 3. Training keeps two checkpoints, and a run that blows up keeps the best one.


def test_training_keeps_the_previous_checkpoint_and_info_and_resume_read_them(tmp_path, capsys):
    assert pretrain_into(tmp_path, 8) == 0
    previous = tmp_path / "checkpoint.previous.safetensors"
    assert load_checkpoint(tmp_path / "checkpoint.safetensors").metadata["step"] == 8
    assert load_checkpoint(previous).metadata["step"] == 4
    assert json.loads((tmp_path / "checkpoint.previous.json").read_text())["step"] == 4
    capsys.readouterr()
    assert main(["info", str(previous)]) == 0
    assert "step: 4" in capsys.readouterr().out
    assert main(["pretrain", "--resume", "--steps", "12", "--quiet", "--out", str(tmp_path)]) == 0
    assert load_checkpoint(previous).metadata["step"] == 8


def test_finetune_keeps_the_previous_adapter_and_state_beside_the_current_ones(trained_run, capsys):
    assert load_checkpoint(trained_run / "finetune_state.previous.safetensors").metadata["step"] == 4
    capsys.readouterr()
    assert main(["info", str(trained_run / "adapter.previous.safetensors")]) == 0
    assert "'step': 4" in capsys.readouterr().out


def test_a_finite_but_blown_up_validation_stops_and_keeps_the_best_checkpoint(tmp_path, monkeypatch, capsys):
    real = minilora.io.data.bits_per_byte
    calls = []

    def blown_up_at_the_third_evaluation(*args, **kwargs):  # what issue 32 saw: 12,843,934 against 7.475
        calls.append(1)
        return real(*args, **kwargs) if len(calls) < 3 else 12_843_934.0

    monkeypatch.setattr(minilora.io.data, "bits_per_byte", blown_up_at_the_third_evaluation)
    assert pretrain_into(tmp_path, 12) == 1
    (line,) = error_lines(capsys)
    names = ("checkpoint.safetensors", "checkpoint.previous.safetensors")
    current, previous = (load_checkpoint(tmp_path / name) for name in names)
    assert current.metadata["step"] == 8 and previous.metadata["step"] == 4  # the blown-up step 12: not saved
    best, name = min(zip((current, previous), names), key=lambda pair: pair[0].metadata["val_bits_per_byte"])
    assert "validation bits per byte became 12,843,934.0000, more than 4 times the best" in line
    assert f"the best checkpoint kept is {tmp_path / name}, of step {best.metadata['step']}" in line


# 4. A kill while a folder is written never leaves a mixed folder.

KILLED_MERGE = """
import os, signal
from pathlib import Path
import minilora.io.hf_checkpoint as hf
from minilora.llama import Llama, LlamaConfig, init_llama_params

real_write = hf.atomic_write_bytes


def write_then_die(path, payload):  # the new weights are written, then the process is killed
    real_write(path, payload)
    if Path(path).name == hf.HF_WEIGHTS:
        os.kill(os.getpid(), signal.SIGKILL)


hf.atomic_write_bytes = write_then_die
config = LlamaConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, ffn_hidden=32, vocab_size=40, block_size=8)
hf.save_hf_llama(Llama(config, init_llama_params(config, seed=2)), {out!r}, "float16", overwrite=True)
"""


def hf_folder_dtypes(folder: Path) -> tuple[str, set]:
    """(the dtype config.json says, the dtypes model.safetensors holds)."""
    from safetensors.numpy import load_file

    said = json.loads((folder / "config.json").read_text())["torch_dtype"]
    return said, {str(t.dtype) for t in load_file(folder / "model.safetensors").values()}


def test_a_kill_while_merging_over_a_hugging_face_folder_leaves_the_old_folder_whole(tmp_path):
    from minilora.io.hf_checkpoint import save_hf_llama
    from minilora.llama import Llama, LlamaConfig, init_llama_params

    out = tmp_path / "merged"
    config = LlamaConfig(
        n_layer=1, n_head=2, n_kv_head=1, n_embd=16, ffn_hidden=32, vocab_size=40, block_size=8
    )
    save_hf_llama(Llama(config, init_llama_params(config, seed=1)), out, "float32")
    before = contents(out)
    script = textwrap.dedent(KILLED_MERGE).format(out=str(out))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert hf_folder_dtypes(out) == ("float32", {"float32"})  # never float16 weights under a float32 config
    assert contents(out) == before
    save_hf_llama(Llama(config, init_llama_params(config, seed=2)), out, "float16", overwrite=True)
    assert hf_folder_dtypes(out) == ("float16", {"float16"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # the killed writer's staging is gone
