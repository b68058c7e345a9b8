"""The command line's small promises: errors from the right subcommand, help without repeated
defaults, eval's size line, eval under training's thread policy, named extras, provenance, the demo plot."""

import subprocess
import sys

import numpy as np
import pytest

import minilora.training.evaluate as evaluate
from minilora.cli import main
from minilora.fast.cpu.ops import CPU_OPS
from minilora.io.provenance import git_commit


def test_an_unknown_option_is_reported_by_its_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--bogus"])
    assert exit_info.value.code == 2
    assert "minilora finetune: error: unrecognized arguments: --bogus" in capsys.readouterr().err


def test_help_states_each_default_once_and_never_none(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    assert "(default 2000)" in text  # --steps, from TrainSettings
    assert "(default: None)" not in text
    assert "(default 2000) (default" not in text.replace("\n", " ")


def test_eval_with_max_windows_reports_the_bytes_it_scored(capsys):
    assert main(["eval", "--corpus", "devils_dictionary", "--max-windows", "2", "--batch-size", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("(512 bytes in 2 windows)"), line  # 2 windows of the shipped base's 256 bytes


def test_eval_runs_with_the_fast_layers_and_one_blas_thread(monkeypatch, capsys):
    from threadpoolctl import threadpool_info

    seen = {}
    original = evaluate.bits_per_byte

    def spy(model, *args, **kwargs):
        seen["ops"] = model.ops
        seen["blas_threads"] = {
            info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"
        }
        return original(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "bits_per_byte", spy)
    assert main(["eval", "--corpus", "devils_dictionary", "--max-windows", "1", "--batch-size", "1"]) == 0
    assert seen["ops"] is CPU_OPS
    assert seen["blas_threads"] == {1}


def test_assignment_release_without_nbformat_names_the_notebooks_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "nbformat", None)  # import nbformat now raises ImportError
    assert main(["assignment", "release", "a1", "--out", str(tmp_path / "a1")]) == 1
    err = capsys.readouterr().err
    assert "needs nbformat" in err and "minilora[notebooks]" in err


def test_provenance_ignores_a_repository_around_an_installed_copy(tmp_path):
    subprocess.run(["git", "init", "--quiet", str(tmp_path)], check=True)
    subprocess.run(
        ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet",
         "--allow-empty", "-m", "unrelated"],
        check=True,
    )  # fmt: skip
    installed = tmp_path / "venv" / "lib" / "python3" / "site-packages"
    installed.mkdir(parents=True)
    assert git_commit(installed) is None  # the enclosing repository's commit is not minilora's


def test_demo_plot_starts_at_step_0_and_draws_forgetting(tmp_path, monkeypatch):
    import minilora.lab.demo as demo

    drawn = {}
    monkeypatch.setattr(
        demo, "plot_loss_curve", lambda losses, evals, path, **kw: drawn.update(evals=evals, **kw)
    )
    results = demo.run_demo(tmp_path, "cpu", demo.QUICK_DEMO, say=lambda line: None)
    assert drawn["evals"][0] == {"step": 0, "val_bits_per_byte": results["bits_per_byte_before"]["folio"]}
    (forgetting,) = drawn["others"].values()
    assert [point["step"] for point in forgetting] == [0, demo.QUICK_DEMO.steps]
    assert np.isclose(forgetting[-1]["val_bits_per_byte"], results["bits_per_byte_after"]["modern"])
