"""Checkpoints are atomic and complete; training resumes exactly and stops cleanly on NaN."""

import json
import os

import numpy as np
import pytest

import minilora.io.checkpoint
import minilora.jobs.pretrain
from minilora.config import GPTConfig
from minilora.io.checkpoint import CheckpointError, check_params_fit, load_checkpoint, save_checkpoint
from minilora.jobs.pretrain import CHECKPOINT_NAME, pretrain
from minilora.model import init_params
from minilora.optim import AdamW
from minilora.training.loop import TrainingDiverged, TrainSettings

MICRO = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)


def micro_settings(**changes):
    values = dict(steps=8, batch_size=4, warmup_steps=2, eval_interval=4, eval_windows=4, log_interval=1)
    return TrainSettings(**{**values, **changes})


def run(out_dir, **kwargs):
    return pretrain(
        "devils_dictionary",
        MICRO,
        kwargs.pop("settings", micro_settings()),
        out_dir,
        device="cpu",
        progress=False,
        **kwargs,
    )


def test_checkpoint_round_trip_keeps_params_optimizer_and_metadata(tmp_path):
    params = init_params(MICRO, seed=1)
    optimizer = AdamW(params, list(params))
    optimizer.step({name: np.ones_like(value) for name, value in params.items()})
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, params, {"step": 3, "config": MICRO.to_dict()}, optimizer.state_dict())
    loaded = load_checkpoint(path)
    assert all(np.array_equal(loaded.params[name], params[name]) for name in params)
    assert loaded.metadata["step"] == 3 and loaded.optimizer["step_count"] == 1
    assert set(loaded.optimizer["buffers"]) == set(optimizer.state_dict()["buffers"])
    assert json.loads((tmp_path / "ckpt.json").read_text())["config"] == MICRO.to_dict()


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    old = init_params(MICRO, seed=1)
    save_checkpoint(path, old, {"step": 1})

    def crash_after_half(fd, payload):  # the disk write dies half-way through the new file
        os.write(fd, payload[: len(payload) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(minilora.io.checkpoint, "write_all", crash_after_half)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, init_params(MICRO, seed=2), {"step": 2})
    loaded = load_checkpoint(path)
    assert loaded.metadata["step"] == 1
    assert all(np.array_equal(loaded.params[name], old[name]) for name in old)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt.json",
        "ckpt.safetensors",
    ]  # no temp file left


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, init_params(MICRO), {"step": 1})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_missing_checkpoint_and_foreign_file_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(garbage)


def test_params_that_do_not_fit_name_the_key_and_both_shapes():
    shapes = MICRO.parameter_shapes()
    params = init_params(MICRO)
    params["transformer.wpe.weight"] = np.zeros((8, 16), dtype=np.float32)
    with pytest.raises(CheckpointError, match=r"'transformer.wpe.weight' has shape \(8, 16\).*\(16, 16\)"):
        check_params_fit(params, shapes, "ckpt")
    params = init_params(MICRO)
    del params["transformer.ln_f.bias"]
    with pytest.raises(CheckpointError, match="missing parameter 'transformer.ln_f.bias'"):
        check_params_fit(params, shapes, "ckpt")


def test_training_is_deterministic_for_a_seed(tmp_path):
    model_a, result_a = run(tmp_path / "a")
    model_b, result_b = run(tmp_path / "b")
    assert [e["loss"] for e in result_a.losses] == [e["loss"] for e in result_b.losses]
    assert all(np.array_equal(model_a.params[n], model_b.params[n]) for n in model_a.params)


def test_loss_goes_down(tmp_path):
    _, result = run(tmp_path, settings=micro_settings(steps=40, lr=3e-3, eval_interval=40))
    assert result.losses[-1]["loss"] < result.losses[0]["loss"] - 1.0


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch):
    straight, _ = run(tmp_path / "straight")
    original_save = minilora.jobs.pretrain.save_checkpoint

    def save_then_crash(path, params, metadata, optimizer_state):
        original_save(path, params, metadata, optimizer_state)
        raise KeyboardInterrupt  # the run dies right after its step-4 checkpoint

    monkeypatch.setattr(minilora.jobs.pretrain, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME).metadata["step"] == 4
    resumed, _ = pretrain(None, None, None, tmp_path / "resumed", device="cpu", resume=True, progress=False)
    assert all(np.array_equal(straight.params[n], resumed.params[n]) for n in straight.params)
    final = load_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME)
    reference = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    assert final.metadata["step"] == reference.metadata["step"] == 8
    assert all(
        np.array_equal(final.optimizer["buffers"][k], v) for k, v in reference.optimizer["buffers"].items()
    )


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original_step = AdamW.step

    def step_then_poison(self, grads, lr=None):
        original_step(self, grads, lr)
        if self.step_count == 6:  # after the checkpoint at step 4
            self.params["transformer.ln_f.weight"][0] = np.nan

    monkeypatch.setattr(AdamW, "step", step_then_poison)
    with pytest.raises(
        TrainingDiverged, match=r"step 6: the loss became nan; the best checkpoint kept is .*, of step 4"
    ):
        run(tmp_path)
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint.metadata["step"] == 4
    assert all(np.isfinite(value).all() for value in checkpoint.params.values())
