"""Never lose a run: no checkpoint of a diverged model, no silent overwrite, one writer per folder,
an unwritable folder found before training, resumes that are exact or refused, leftovers cleaned."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minilora.io.checkpoint
import minilora.io.data
import minilora.jobs.pretrain
from minilora.cli import main
from minilora.config import GPTConfig
from minilora.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minilora.io.run_folder import LOCK_NAME, RunFolderError
from minilora.jobs.pretrain import CHECKPOINT_NAME, RESULTS_NAME, pretrain
from minilora.model import init_params
from minilora.optim import AdamW
from minilora.training.loop import TrainingDiverged, TrainSettings

MICRO = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
MICRO_FLAGS = [
    *("--corpus", "devils_dictionary", "--preset", "tiny", "--n-layer", "1", "--n-embd", "16"),
    *("--block-size", "16", "--batch-size", "4", "--steps", "8", "--eval-interval", "4"),
    *("--eval-windows", "4", "--warmup-steps", "2", "--quiet"),
]


def micro_settings(**changes):
    values = dict(steps=8, batch_size=4, warmup_steps=2, eval_interval=4, eval_windows=4, log_interval=1)
    return TrainSettings(**{**values, **changes})


def run(out_dir, **kwargs):
    settings = kwargs.pop("settings", micro_settings())
    return pretrain("devils_dictionary", MICRO, settings, out_dir, device="cpu", progress=False, **kwargs)


def resume(out_dir, steps=None, **kwargs):
    overrides = None if steps is None else {"steps": steps}
    return pretrain(None, None, None, out_dir, device="cpu", resume=True, settings_overrides=overrides,
                    progress=False, **kwargs)  # fmt: skip


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def poison_after(step_count: int, monkeypatch) -> None:
    """Put a NaN into a weight after the optimiser's ``step_count``-th update."""
    original_step = AdamW.step

    def step_then_poison(self, grads, lr=None):
        original_step(self, grads, lr)
        if self.step_count == step_count:
            self.params["transformer.ln_f.weight"][0] = np.nan

    monkeypatch.setattr(AdamW, "step", step_then_poison)


# 1. A diverged run never overwrites the last good checkpoint, and says what exists.


def test_nan_validation_with_finite_weights_is_not_saved(tmp_path, monkeypatch):
    real = minilora.io.data.bits_per_byte
    calls = []

    def nan_at_the_second_evaluation(*args, **kwargs):  # what --lr 1e3 gives: weights finite, val NaN
        calls.append(1)
        return real(*args, **kwargs) if len(calls) == 1 else float("nan")

    monkeypatch.setattr(minilora.io.data, "bits_per_byte", nan_at_the_second_evaluation)
    with pytest.raises(TrainingDiverged) as raised:
        run(tmp_path)
    assert "validation bits per byte became nan" in str(raised.value)
    assert f"the best checkpoint kept is {tmp_path / CHECKPOINT_NAME}, of step 4" in str(raised.value)
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint.metadata["step"] == 4 and np.isfinite(checkpoint.metadata["val_bits_per_byte"])


def test_divergence_before_the_first_save_says_no_checkpoint_was_written(tmp_path, monkeypatch):
    poison_after(2, monkeypatch)  # the loss of step 3 is NaN, before the first save at step 4
    with pytest.raises(TrainingDiverged, match=f"no checkpoint was written in {tmp_path}"):
        run(tmp_path)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_divergence_of_a_resumed_run_names_the_checkpoint_it_resumed_from(tmp_path, monkeypatch):
    run(tmp_path, settings=micro_settings(steps=4))
    poison_after(6, monkeypatch)  # the optimiser's count goes on from 4
    with pytest.raises(
        TrainingDiverged, match=r"the best checkpoint kept is .*checkpoint.safetensors, of step 4"
    ):
        resume(tmp_path, steps=12)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).metadata["step"] == 4


# 2. A folder holding a run is refused without --resume or --overwrite.


def test_pretrain_into_a_folder_holding_a_run_is_refused(tmp_path, capsys):
    assert main(["pretrain", *MICRO_FLAGS, "--out", str(tmp_path)]) == 0
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    capsys.readouterr()
    assert main(["pretrain", *MICRO_FLAGS, "--seed", "1", "--out", str(tmp_path)]) == 1
    (line,) = error_lines(capsys)
    assert str(tmp_path) in line and "--resume" in line and "--overwrite" in line
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert main(["pretrain", *MICRO_FLAGS, "--seed", "1", "--overwrite", "--out", str(tmp_path)]) == 0
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() != before
    assert not (tmp_path / LOCK_NAME).exists()  # the lock goes with the run


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    params = init_params(MICRO, seed=0)
    save_checkpoint(out / CHECKPOINT_NAME, params, {"config": MICRO.to_dict()})
    return out


FINETUNE_FLAGS = [
    *("--corpus", "shakespeare_folio", "--steps", "8", "--eval-interval", "4", "--eval-windows", "4"),
    *("--batch-size", "4", "--warmup-steps", "1", "--r", "2", "--log-interval", "1", "--quiet"),
]


def test_finetune_into_a_folder_holding_a_run_is_refused(base_dir, tmp_path, capsys):
    assert main(["finetune", "--base", str(base_dir), *FINETUNE_FLAGS, "--out", str(tmp_path)]) == 0
    before = (tmp_path / "adapter.safetensors").read_bytes()
    capsys.readouterr()
    assert (
        main(["finetune", "--base", str(base_dir), *FINETUNE_FLAGS, "--r", "4", "--out", str(tmp_path)]) == 1
    )
    (line,) = error_lines(capsys)
    assert str(tmp_path) in line and "--resume" in line and "--overwrite" in line
    assert (tmp_path / "adapter.safetensors").read_bytes() == before


def lora_model(alpha: float):
    from minilora.lora.config import LoraConfig
    from minilora.lora.model import add_lora
    from minilora.model import GPT

    config = LoraConfig(r=2, lora_alpha=alpha, target_modules=("c_attn",), init="random")
    return add_lora(GPT(MICRO, init_params(MICRO, seed=0)), config, seed=int(alpha))


def test_export_peft_into_a_non_empty_folder_is_refused(tmp_path):
    from minilora.io.peft import export_peft

    out = tmp_path / "peft"
    export_peft(lora_model(16.0), out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(
        RunFolderError, match=f"{out} holds the result of an earlier minilora export-peft.*--overwrite"
    ):
        export_peft(lora_model(4.0), out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"holds files minilora export-peft did not write \(notes.txt\)"):
        export_peft(lora_model(4.0), out, overwrite=True)


def test_a_crash_while_exporting_over_an_adapter_leaves_the_old_pair_whole(tmp_path, monkeypatch):
    import minilora.io.peft
    from minilora.io.peft import PEFT_CONFIG, export_peft, read_peft

    out = tmp_path / "peft"
    old_model = lora_model(16.0)
    export_peft(old_model, out)
    real_write = minilora.io.peft.atomic_write_bytes

    def crash_at_the_config(path, payload):  # the weights are written, then the process dies
        if Path(path).name == PEFT_CONFIG:
            raise KeyboardInterrupt
        real_write(path, payload)

    monkeypatch.setattr(minilora.io.peft, "atomic_write_bytes", crash_at_the_config)
    with pytest.raises(KeyboardInterrupt):
        export_peft(lora_model(4.0), out, overwrite=True)
    config, tensors = read_peft(out)
    assert config["lora_alpha"] == 16.0
    assert all(np.array_equal(tensors[name], old_model.params[name]) for name in old_model.trainable_names)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["peft"]  # no staging folder left
    monkeypatch.undo()
    export_peft(lora_model(4.0), out, overwrite=True)
    assert read_peft(out)[0]["lora_alpha"] == 4.0


# 3. merge --out x.json would write its JSON sidecar over its own output.


def test_merge_refuses_a_json_output_name(base_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert main(["finetune", "--base", str(base_dir), *FINETUNE_FLAGS, "--out", str(adapter)]) == 0
    capsys.readouterr()
    out = tmp_path / "merged.json"
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter), "--out", str(out)]) == 1
    (line,) = error_lines(capsys)
    assert str(out) in line and "sidecar" in line
    assert not out.exists()
    with pytest.raises(CheckpointError, match="sidecar"):
        save_checkpoint(out, init_params(MICRO), {})


# 5. One writer per folder.


def test_a_second_process_on_a_locked_folder_is_refused_with_the_holders_pid(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from minilora.io.run_folder import folder_lock\n"
         f"with folder_lock({str(tmp_path)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["pretrain", *MICRO_FLAGS, "--out", str(tmp_path)]) == 1
        (line,) = error_lines(capsys)
        assert str(tmp_path) in line and f"pid {holder.pid}" in line and "in use" in line
        assert not (tmp_path / CHECKPOINT_NAME).exists()
    finally:
        holder.communicate("")  # closing its stdin lets it leave the lock
    assert holder.returncode == 0
    assert main(["pretrain", *MICRO_FLAGS, "--out", str(tmp_path)]) == 0  # free again once it exited


# 8. An unwritable folder is found before training; OSError is one line naming the path.


def deny_writes_in(directory: Path, monkeypatch) -> None:
    """os.open refuses to create files in ``directory``, as a read-only folder does (even for root)."""
    real_open = os.open

    def guarded_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).parent == directory:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)


def test_an_unwritable_folder_is_refused_before_any_training(tmp_path, monkeypatch, capsys):
    steps = []
    real_train_step = minilora.jobs.pretrain.accelerate

    def counting_accelerate(*args, **kwargs):
        step = real_train_step(*args, **kwargs)
        return lambda *a, **k: steps.append(1) or step(*a, **k)

    monkeypatch.setattr(minilora.jobs.pretrain, "accelerate", counting_accelerate)
    out = tmp_path / "read_only"
    out.mkdir()
    deny_writes_in(out, monkeypatch)
    assert main(["pretrain", *MICRO_FLAGS, "--out", str(out)]) == 1
    (line,) = error_lines(capsys)
    assert f"cannot write to {out}" in line and "Permission denied" in line
    assert steps == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_chmod_read_only_folder_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["pretrain", *MICRO_FLAGS, "--out", str(out)]) == 1
    finally:
        out.chmod(0o755)
    (line,) = error_lines(capsys)
    assert f"cannot write to {out}" in line


def test_a_full_disk_at_a_save_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    def disk_full(fd, payload):
        raise OSError(errno.ENOSPC, "No space left on device")  # os.write names no file

    monkeypatch.setattr(minilora.io.checkpoint, "write_all", disk_full)
    assert main(["pretrain", *MICRO_FLAGS, "--out", str(tmp_path)]) == 1
    (line,) = error_lines(capsys)
    assert str(tmp_path / CHECKPOINT_NAME) in line and "No space left on device" in line


# 10. Resumes that would not be exact, or would train nothing, are refused; leftovers are cleaned.


def test_a_checkpoint_missing_an_optimizer_moment_is_refused(tmp_path):
    run(tmp_path, settings=micro_settings(steps=4))
    path = tmp_path / CHECKPOINT_NAME
    checkpoint = load_checkpoint(path)
    key = "exp_avg_sq.transformer.wte.weight"
    del checkpoint.optimizer["buffers"][key]
    save_checkpoint(path, checkpoint.params, checkpoint.metadata, checkpoint.optimizer)
    with pytest.raises(
        CheckpointError, match=f"lacks the optimiser state '{key}'.*cannot be resumed exactly"
    ):
        resume(tmp_path, steps=8)
    metadata = {k: v for k, v in checkpoint.metadata.items() if k != "optimizer_step_count"}
    save_checkpoint(path, checkpoint.params, metadata)  # no optimiser state at all
    with pytest.raises(CheckpointError, match="holds no optimiser state"):
        resume(tmp_path, steps=8)


@pytest.mark.parametrize("steps", ["4", "8"])
def test_resume_with_steps_not_beyond_the_checkpoint_is_refused(tmp_path, capsys, steps):
    assert main(["pretrain", *MICRO_FLAGS, "--out", str(tmp_path)]) == 0
    results = (tmp_path / RESULTS_NAME).read_bytes()
    capsys.readouterr()
    assert main(["pretrain", "--out", str(tmp_path), "--resume", "--steps", steps, "--quiet"]) == 1
    (line,) = error_lines(capsys)
    assert "at step 8" in line and f"--steps {steps}" in line and str(tmp_path) in line
    assert (tmp_path / RESULTS_NAME).read_bytes() == results


def test_resume_prints_the_step_it_resumes_from(tmp_path, capsys):
    run(tmp_path, settings=micro_settings(steps=4))
    capsys.readouterr()
    resume(tmp_path, steps=8)
    assert f"resuming from step 4 of 8 ({tmp_path / CHECKPOINT_NAME})" in capsys.readouterr().out


def test_leftover_temp_files_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / f".{CHECKPOINT_NAME}.tmp-{dead_pid}"
    live = tmp_path / f".{CHECKPOINT_NAME}.tmp-{os.getppid()}"  # its writer (our parent) is alive
    unrelated = [tmp_path / f"notes.tmp-{dead_pid}", tmp_path / f".notes.tmp-{dead_pid}x"]
    for path in (stale, live, *unrelated):
        path.write_bytes(b"half a checkpoint")
    run(tmp_path, settings=micro_settings(steps=4))
    assert not stale.exists()
    assert live.exists() and all(path.exists() for path in unrelated)


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        resume(tmp_path, overwrite=True)


# finetune --resume: k steps + save + resume + (N - k) steps equal N steps.


@pytest.mark.parametrize("mode", [["--r", "2", "--lora-dropout", "0.1"], ["--full"]], ids=["lora", "full"])
def test_finetune_resume_reproduces_an_uninterrupted_run_bit_for_bit(base_dir, tmp_path, monkeypatch, mode):
    import minilora.jobs.finetune

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shared = [flag for flag in FINETUNE_FLAGS if flag not in ("--r", "2")]  # --full refuses LoRA's --r
    flags = ["finetune", "--base", str(base_dir), *shared, *mode]
    assert main([*flags, "--out", str(straight)]) == 0
    original_save = minilora.jobs.finetune.save_checkpoint

    def save_then_crash(path, params, metadata, optimizer_state=None):
        original_save(path, params, metadata, optimizer_state)
        if optimizer_state is not None:
            raise KeyboardInterrupt  # the run dies right after its step-4 state is written

    monkeypatch.setattr(minilora.jobs.finetune, "save_checkpoint", save_then_crash)
    assert main([*flags, "--out", str(resumed)]) == 130
    monkeypatch.undo()
    assert load_checkpoint(resumed / "finetune_state.safetensors").metadata["step"] == 4
    assert main(["finetune", "--resume", "--out", str(resumed), "--quiet"]) == 0
    final = load_checkpoint(resumed / "finetune_state.safetensors")
    reference = load_checkpoint(straight / "finetune_state.safetensors")
    assert final.metadata["step"] == reference.metadata["step"] == 8
    assert set(final.params) == set(reference.params)
    assert all(np.array_equal(final.params[k], v) for k, v in reference.params.items())
    assert all(
        np.array_equal(final.optimizer["buffers"][k], v) for k, v in reference.optimizer["buffers"].items()
    )
    deliverable = "checkpoint.safetensors" if mode == ["--full"] else "adapter.safetensors"
    assert (resumed / deliverable).read_bytes() == (straight / deliverable).read_bytes()
    metrics = [json.loads((d / "finetune_metrics.json").read_text()) for d in (straight, resumed)]
    assert metrics[0]["val_bits_per_byte_after"] == metrics[1]["val_bits_per_byte_after"]


def test_finetune_resume_without_a_state_is_a_clear_error(tmp_path, capsys):
    assert main(["finetune", "--resume", "--out", str(tmp_path), "--quiet"]) == 1
    (line,) = error_lines(capsys)
    assert "checkpoint not found" in line and "finetune_state.safetensors" in line


# experiment memory --out NEWDIR makes the folder.


def test_experiment_memory_makes_its_output_folder(tmp_path, monkeypatch):
    import minilora.lab.bench

    monkeypatch.setattr(minilora.lab.bench, "BENCH_BATCH_SIZES", {"tiny": 1, "small": 1})  # a quick ledger
    out = tmp_path / "new" / "dir"
    assert main(["experiment", "memory", "--out", str(out)]) == 0
    assert json.loads((out / "memory.json").read_text())[0]["preset"] == "tiny"
