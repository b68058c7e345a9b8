"""Every invalid value is one clear error: a ValueError, or one CLI ``error:`` line, naming it.

Numbers on the command line, configs in JSON files, PEFT adapters, checkpoints whose metadata
claims what their tensors do not hold, dtypes NumPy lacks, files that are not UTF-8 or nest too
deeply: each must fail at once, saying which value, key or file is wrong.
"""

import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from minilora.cli import main
from minilora.config import GPTConfig
from minilora.io.adapters import AdapterError, load_adapter, read_adapter, save_adapter
from minilora.io.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from minilora.io.peft import PEFT_CONFIG, export_peft, import_peft
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.training.loop import TrainSettings

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=256)


def one_line_error(capsys, command: str) -> str:
    """The CLI's stderr, checked to be one line beginning with ``minilora <command>: error:``."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"minilora {command}: error: "), err
    return err


@pytest.fixture
def base_file(tmp_path):
    path = tmp_path / "base.safetensors"
    save_checkpoint(path, init_params(CONFIG, seed=0), {"kind": "base", "config": CONFIG.to_dict()})
    return path


@pytest.fixture
def peft_dir(base_file, tmp_path):
    """A PEFT adapter exported from an rsLoRA adapter on the base, and a function to edit its config."""
    model = add_lora(load_model(base_file), LoraConfig(r=4, init="random", use_rslora=True))
    directory = tmp_path / "peft"
    export_peft(model, directory)
    return directory


def edit_json(path, **changes):
    document = json.loads(path.read_text())
    document.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del document[key]
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    "argv, named",
    [
        (["eval", "--batch-size", "0"], "argument --batch-size: '0' is not a positive integer"),
        (["eval", "--max-windows", "0"], "argument --max-windows: '0' is not a positive integer"),
        (["generate", "--max-new-tokens", "-5"], "argument --max-new-tokens: '-5' is not a non-negative"),
        (["finetune", "--grad-clip", "nan"], "argument --grad-clip: 'nan' is not a finite number"),
        (["finetune", "--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
        (["finetune", "--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
        (["pretrain", "--lr=-1e-3"], "argument --lr: '-1e-3' is not a positive number"),
        (["pretrain", "--steps", "2.5"], "argument --steps: '2.5' is not an integer"),
        (["pretrain", "--dropout", "1.5"], "argument --dropout: '1.5' is not in [0, 1)"),
    ],
)
def test_bad_numbers_on_the_command_line_are_one_error_line(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert named in one_line_error(capsys, argv[0])


def test_min_lr_above_lr_is_refused_on_the_command_line(base_file, tmp_path, capsys):
    argv = [
        "finetune",
        "--base",
        str(base_file),
        "--lr",
        "1e-4",
        "--min-lr",
        "1e-3",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 1
    assert "min_lr (0.001) must not be above lr (0.0001)" in one_line_error(capsys, "finetune")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "values, named",
    [
        ({"lr": math.nan}, "lr must be a finite number"),
        ({"lr": math.inf}, "lr must be a finite number"),
        ({"grad_clip": math.nan}, "grad_clip must be a finite number"),  # NaN > 0 is False: clipping off
        ({"min_lr": 1e-2, "lr": 1e-3}, "min_lr (0.01) must not be above lr (0.001)"),
        ({"batch_size": "16"}, "batch_size must be an integer, got '16'"),
        ({"steps": True}, "steps must be an integer, got True"),
    ],
)
def test_train_settings_name_the_bad_field(values, named):
    with pytest.raises(ValueError, match=f"^{re.escape(named)}"):
        TrainSettings(**values)


@pytest.mark.parametrize(
    "values, named",
    [
        ({"r": "8"}, "LoRA rank r must be a positive integer, got '8'"),
        ({"r": 4.9}, "LoRA rank r must be a positive integer, got 4.9"),
        ({"lora_alpha": "16"}, "LoraConfig.lora_alpha must be a number"),
        ({"lora_alpha": math.nan}, "LoraConfig.lora_alpha must be a finite number"),
        ({"lora_dropout": None}, "LoraConfig.lora_dropout must be a number"),
        ({"use_rslora": "false"}, "LoraConfig.use_rslora must be true or false, got 'false'"),
        ({"use_dora": 1}, "LoraConfig.use_dora must be true or false, got 1"),
        (
            {"target_modules": "c_attn("},
            "LoraConfig.target_modules 'c_attn(' is not a valid regular expression",
        ),
        ({"target_modules": [3]}, "LoraConfig.target_modules must be a string or a list of names"),
        ({"layers_to_transform": ["0"]}, "LoraConfig.layers_to_transform entry must be an integer, got '0'"),
        ({"layers_to_transform": -1}, "LoraConfig.layers_to_transform must be an integer >= 0, got -1"),
    ],
)
def test_lora_config_names_the_bad_field(values, named):
    with pytest.raises(ValueError) as error:
        LoraConfig.from_dict(values)
    assert named in str(error.value)


@pytest.mark.parametrize(
    "values, named",
    [
        ({"n_layer": "2"}, "GPTConfig.n_layer must be an integer, got '2'"),
        ({"n_embd": 8.0}, "GPTConfig.n_embd must be an integer, got 8.0"),
        ({"n_head": True}, "GPTConfig.n_head must be an integer, got True"),
        ({"dropout": "0.1"}, "GPTConfig.dropout must be a number, got '0.1'"),
        ({"dropout": math.nan}, "GPTConfig.dropout must be a finite number"),
        ({"bias": "false"}, "GPTConfig.bias must be true or false, got 'false'"),
    ],
)
def test_gpt_config_names_the_bad_field(values, named):
    with pytest.raises(ValueError) as error:
        GPTConfig.from_dict({**CONFIG.to_dict(), **values})
    assert named in str(error.value)


def test_a_peft_config_without_r_is_one_error_line_naming_it(peft_dir, base_file, tmp_path, capsys):
    edit_json(peft_dir / PEFT_CONFIG, r=None)  # was a bare KeyError: "error: 'r'"
    argv = ["import-peft", "--base", str(base_file), "--peft", str(peft_dir), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = one_line_error(capsys, "import-peft")
    assert f"{peft_dir / PEFT_CONFIG}: the PEFT config lacks ['r']" in err


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"r": 4.9}, "LoRA rank r must be a positive integer, got 4.9"),  # was silently int(4.9) = 4
        ({"use_rslora": "false"}, "LoraConfig.use_rslora must be true or false"),  # was bool("false")
        ({"lora_alpha": "8"}, "LoraConfig.lora_alpha must be a number"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa', which changed the base's weights"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights 'pissa_niter_4', which changed"),
        ({"init_lora_weights": "olora"}, "init_lora_weights 'olora', which changed the base's weights"),
        (
            {"fan_in_fan_out": "false"},
            "fan_in_fan_out must be true or false, got 'false'",
        ),  # was bool("false")
    ],
)
def test_peft_import_refuses_what_it_would_misread(changes, named, peft_dir, base_file):
    edit_json(peft_dir / PEFT_CONFIG, **changes)
    with pytest.raises(AdapterError) as error:
        import_peft(load_model(base_file), peft_dir)
    assert str(error.value).startswith(f"{peft_dir / PEFT_CONFIG}: ") and named in str(error.value)


def test_peft_import_honours_rslora(peft_dir, base_file, tmp_path):
    # r = 4: lora_alpha / sqrt(r) is twice lora_alpha / r, so ignoring use_rslora moves the logits.
    base = load_model(base_file)
    exported = add_lora(load_model(base_file), LoraConfig(r=4, init="random", use_rslora=True))
    imported = import_peft(base, peft_dir)
    assert imported.lora_config.use_rslora
    ids = np.arange(6)[None, :]
    np.testing.assert_allclose(imported.forward(ids)[0], exported.forward(ids)[0], rtol=1e-6, atol=1e-6)


def test_json_that_is_not_utf8_or_nests_too_deeply_names_the_file(peft_dir, base_file):
    config = peft_dir / PEFT_CONFIG
    config.write_bytes(b'{"r": 4, "note": "caf\xe9"}')  # Latin-1, not UTF-8
    with pytest.raises(AdapterError, match=f"^{config} is not UTF-8 text"):
        import_peft(load_model(base_file), peft_dir)
    config.write_text("[" * 100_000 + "]" * 100_000)  # RecursionError inside json
    with pytest.raises(AdapterError, match=f"^{config} is nested too deeply"):
        import_peft(load_model(base_file), peft_dir)


def test_checkpoint_metadata_that_nests_too_deeply_names_the_file(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file({"params.x": torch.zeros(1)}, str(path), metadata={"minilora": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match=f"checkpoint {path}'s metadata is nested too deeply"):
        load_checkpoint(path)


def test_bfloat16_tensors_load_as_the_same_float32_values(base_file, tmp_path):
    checkpoint = load_checkpoint(base_file)
    as_bf16 = {f"params.{k}": torch.from_numpy(v).to(torch.bfloat16) for k, v in checkpoint.params.items()}
    path = tmp_path / "bf16.safetensors"
    save_file(as_bf16, str(path), metadata={"minilora": json.dumps(checkpoint.metadata)})
    model = load_model(path)  # was: TypeError: data type 'bfloat16' not understood
    for key, value in as_bf16.items():
        expected = value.to(torch.float32).numpy()  # torch's own widening: the oracle
        np.testing.assert_array_equal(model.params[key.removeprefix("params.")], expected)


def test_float8_tensors_are_refused_naming_the_tensor(base_file, tmp_path):
    checkpoint = load_checkpoint(base_file)
    tensors = {f"params.{k}": torch.from_numpy(v) for k, v in checkpoint.params.items()}
    tensors["params.transformer.wte.weight"] = tensors["params.transformer.wte.weight"].to(
        torch.float8_e4m3fn
    )
    path = tmp_path / "f8.safetensors"
    save_file(tensors, str(path), metadata={"minilora": json.dumps(checkpoint.metadata)})
    with pytest.raises(CheckpointError, match=r"tensor 'params.transformer.wte.weight' is stored as F8_E4M3"):
        load_checkpoint(path)


@pytest.fixture
def nothing_sized_by_a_huge_n_layer(monkeypatch):
    """parameter_shapes refuses configs of more than 100 blocks: nothing may be built from the claim first."""
    real = GPTConfig.parameter_shapes

    def guarded(config):
        assert config.n_layer <= 100, f"built parameter_shapes for n_layer={config.n_layer}"
        return real(config)

    monkeypatch.setattr(GPTConfig, "parameter_shapes", guarded)


def test_a_checkpoint_claiming_3_million_blocks_is_refused_before_anything_is_built(
    base_file, tmp_path, capsys, nothing_sized_by_a_huge_n_layer
):
    checkpoint = load_checkpoint(base_file)
    path = tmp_path / "claims.safetensors"
    save_checkpoint(
        path, checkpoint.params, {"kind": "base", "config": {**CONFIG.to_dict(), "n_layer": 3_000_000}}
    )
    expected = "its config claims n_layer=3000000, but its tensors hold 2 (blocks [0, 1]"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_model(path)
    assert main(["info", str(path)]) == 1
    assert expected in one_line_error(capsys, "info")
    assert main(["eval", "--checkpoint", str(path)]) == 1
    assert expected in one_line_error(capsys, "eval")


def test_an_adapter_claiming_a_3_million_block_base_is_refused_before_anything_is_built(
    base_file, tmp_path, capsys, nothing_sized_by_a_huge_n_layer
):
    model = add_lora(load_model(base_file), LoraConfig(r=2, init="random"))
    save_adapter(model, tmp_path / "adapter")
    tensors, document = read_adapter(tmp_path / "adapter")
    document["base_config"]["n_layer"] = 3_000_000
    save_numpy(
        tensors,
        str(tmp_path / "adapter" / "adapter.safetensors"),
        metadata={"minilora_adapter": json.dumps(document)},
    )
    assert main(["info", str(tmp_path / "adapter")]) == 1
    assert "its base_config claims n_layer=3000000, but its tensors adapt 2 blocks" in one_line_error(
        capsys, "info"
    )
    with pytest.raises(AdapterError, match="the adapter was made for a model with config"):
        load_adapter(load_model(base_file), tmp_path / "adapter")


def test_info_describes_a_real_adapter_as_before(base_file, tmp_path, capsys):
    # The table now comes from the adapter's own tensors and the total from one block's count.
    model = add_lora(load_model(base_file), LoraConfig(r=2, init="random", target_modules="all-linear"))
    save_adapter(model, tmp_path / "adapter")
    assert main(["info", str(tmp_path / "adapter")]) == 0
    printed = capsys.readouterr().out
    total = GPT(CONFIG, init_params(CONFIG)).num_parameters()
    trainable = sum(2 * (C_in + C_out) for C_in, C_out in model.adapter.modules.values())
    assert f"trainable params: {trainable:,} || all params: {total + trainable:,}" in printed
    names = [line.split()[0] for line in printed.splitlines() if line.startswith("transformer.h.")]
    assert names == list(model.adapter.modules)


def test_a_small_lr_without_min_lr_decays_to_a_tenth_of_it():
    # min_lr above lr is refused, so its default cannot be a constant: a run at lr 5e-5 must still start.
    assert TrainSettings(lr=5e-5).min_lr == pytest.approx(5e-6)
    assert TrainSettings().min_lr == pytest.approx(1e-4)  # the default run is unchanged


def test_resuming_a_checkpoint_claiming_3_million_blocks_is_refused_before_anything_is_built(
    base_file, tmp_path, monkeypatch, nothing_sized_by_a_huge_n_layer
):
    from minilora.jobs.pretrain import CHECKPOINT_NAME, pretrain

    checkpoint = load_checkpoint(base_file)
    run = tmp_path / "run"
    run.mkdir()
    meta = {
        "kind": "pretrain",
        "config": {**CONFIG.to_dict(), "n_layer": 3_000_000},
        "corpus": "shakespeare_modern",
        "settings": {"steps": 4},
    }
    save_checkpoint(run / CHECKPOINT_NAME, checkpoint.params, meta)
    with pytest.raises(CheckpointError, match="its config claims n_layer=3000000"):
        pretrain("shakespeare_modern", CONFIG, TrainSettings(steps=4), run, resume=True, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float16"}, "--dtype must be float32 or bfloat16, got 'float16'"),
        ({"dtype": "bfloat16"}, "runs on a GPU: add --device cuda"),
    ],
)
def test_finetune_dtype_refusals_name_the_flag(tmp_path, kwargs, message):
    from minilora.jobs.finetune import finetune
    from minilora.lora.config import LoraConfig
    from minilora.training.loop import TrainSettings

    with pytest.raises(ValueError, match=message):
        finetune(None, "shakespeare_folio", LoraConfig(r=2), TrainSettings(steps=1), tmp_path / "run", "cpu",
                 progress=False, **kwargs)  # fmt: skip
    assert not (tmp_path / "run" / "adapter_config.json").exists()


def test_finetune_refuses_smollm2_in_bf16_on_the_cpu_by_the_gpu_rule_before_loading_it(tmp_path, monkeypatch):
    import minilora.jobs.finetune
    from minilora.jobs.finetune import finetune

    monkeypatch.setattr(minilora.jobs.finetune, "load_base", None)  # refused before the weights are fetched
    with pytest.raises(ValueError, match=re.escape("runs on a GPU: add --device cuda, or leave out --dtype")):
        finetune("smollm2", "shakespeare_folio", LoraConfig(r=2), TrainSettings(steps=1), tmp_path / "run", "cpu",
                 progress=False, dtype="bfloat16")  # fmt: skip


def test_finetune_takes_smollm2_in_bf16_on_a_gpu(tmp_path, monkeypatch):
    # No GPU here: the loader hands over a stand-in SmolLM2 (a BPE tokenizer, so not byte-level), and
    # reaching add_lora means that no dtype rule refused it (the old one: "--dtype bfloat16 trains a GPT").
    import minilora.jobs.finetune
    from minilora.io.bases import Base
    from minilora.jobs.finetune import finetune

    class ReachedAddLora(Exception):
        pass

    def add_lora(*args, **kwargs):
        raise ReachedAddLora

    monkeypatch.setattr(minilora.jobs.finetune, "load_base", lambda *args: Base("smollm2", None, object()))
    monkeypatch.setattr(minilora.jobs.finetune, "add_lora", add_lora)
    with pytest.raises(ReachedAddLora):
        finetune("smollm2", "shakespeare_folio", LoraConfig(r=2), TrainSettings(steps=1), tmp_path / "run", "cuda",
                 progress=False, dtype="bfloat16")  # fmt: skip


def test_bf16_refusals_for_full_and_quantized():
    from minilora.jobs.finetune import check_training_dtype
    from minilora.lora.config import LoraConfig

    with pytest.raises(ValueError, match="--full would need float32 master copies"):
        check_training_dtype("bfloat16", "cuda", None, None)
    with pytest.raises(ValueError, match="--quantized do not combine"):
        check_training_dtype("bfloat16", "cuda", LoraConfig(r=2), "q8_0")
    check_training_dtype("float32", "cpu", None, None)  # the default needs nothing


def test_cast_base_keeps_the_fingerprint_and_float32_adapters():
    from minilora.config import get_preset
    from minilora.lora.config import LoraConfig
    from minilora.lora.model import add_lora
    from minilora.model import GPT, init_params

    config = get_preset("tiny")
    model = add_lora(GPT(config, init_params(config, seed=0)), LoraConfig(r=2), seed=0)
    before = model.base_fingerprint
    model.cast_base(np.float16)  # bf16 needs ml_dtypes; the cast is the same code for any dtype
    assert model.base_fingerprint == before
    assert all(model.params[name].dtype == np.float16 for name in model.base_keys)
    assert all(model.params[name].dtype == np.float32 for name in model.trainable_names)
    assert all(model.base_params[name] is model.params[name] for name in model.base_keys)
