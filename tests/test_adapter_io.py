"""Adapter files: only the adapter is saved, bit for bit, tied to its base by a fingerprint, written atomically."""

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes
from safetensors.numpy import save_file

import minilora.io.checkpoint
from minilora.backend import weights_fingerprint
from minilora.config import GPTConfig
from minilora.io.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    load_adapter,
    read_adapter,
    save_adapter,
)
from minilora.io.checkpoint import save_checkpoint
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.optim import AdamW

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16)
C = CONFIG.n_embd
R = 2

# Written out by hand from GPT-2's layout, not taken from the code under test.
LORA_KEYS = {f"transformer.h.{i}.attn.c_attn.lora_{factor}" for i in range(2) for factor in "AB"}
LORA_ONLY_BIASES = {f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)}
ALL_BIASES = {
    f"transformer.h.{i}.{module}.bias"
    for i in range(2)
    for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
}
ALL_BIASES.add("transformer.ln_f.bias")
ADAPTER_KEYS = {"none": LORA_KEYS, "lora_only": LORA_KEYS | LORA_ONLY_BIASES, "all": LORA_KEYS | ALL_BIASES}


def make_base(seed=0, config=CONFIG):
    return GPT(config, init_params(config, seed=seed))


def batch(B=2, seed=0):
    rng = np.random.default_rng(seed)
    shape = (B, CONFIG.block_size)
    return rng.integers(0, CONFIG.vocab_size, shape), rng.integers(0, CONFIG.vocab_size, shape)


def trained_lora(base, bias="none", steps=3, seed=0):
    """A LoRA model after a few real AdamW steps, so lora_B (and any trained bias) is non-zero."""
    model = add_lora(base, LoraConfig(r=R, target_modules=("c_attn",), bias=bias))
    optimizer = AdamW(model.params, model.trainable_names, lr=1e-2)
    for step in range(steps):
        idx, targets = batch(seed=seed + step)
        optimizer.step(model.backward(model.forward(idx, targets)[2]))
    assert all(np.any(model.params[f"transformer.h.{i}.attn.c_attn.lora_B"]) for i in range(2))
    return model


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def file_metadata_document(path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        return json.loads(f.metadata()["minilora_adapter"])


def saved_tensors(path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_round_trip_preserves_every_adapter_tensor_bit_for_bit_and_the_logits_exactly(bias, tmp_path):
    base = make_base()
    base_before = {name: value.copy() for name, value in base.params.items()}
    model = trained_lora(base, bias=bias)
    if bias != "none":  # the trained biases moved away from the base's zeros, so they really travel
        assert np.any(model.params["transformer.h.0.attn.c_attn.bias"])
    save_adapter(model, tmp_path)

    on_disk = saved_tensors(tmp_path / ADAPTER_WEIGHTS)
    assert set(on_disk) == ADAPTER_KEYS[bias]
    for name, value in on_disk.items():
        assert same_bits(value, model.params[name]), name

    loaded = load_adapter(base, tmp_path)
    assert set(loaded.adapter_keys) == ADAPTER_KEYS[bias]
    for name in ADAPTER_KEYS[bias]:
        assert same_bits(loaded.params[name], model.params[name]), name
    idx, _ = batch(B=3, seed=42)
    expected_logits = model.forward(idx)[0]
    assert same_bits(loaded.forward(idx)[0], expected_logits)
    assert not same_bits(base.forward(idx)[0], expected_logits)  # the adapter does change the model
    for name, value in base_before.items():  # neither training nor loading touched the base
        assert same_bits(base.params[name], value), name


def test_adapter_config_json_holds_the_spec_fields_and_equals_the_file_metadata(tmp_path):
    base = make_base()
    model = trained_lora(base)
    save_adapter(model, tmp_path)
    document = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert document == file_metadata_document(tmp_path / ADAPTER_WEIGHTS)
    assert document["variant"] == "lora"
    assert document["format_version"] == 1
    assert document["lora_config"]["r"] == R
    assert document["lora_config"]["lora_alpha"] == 16.0
    assert document["lora_config"]["target_modules"] == ["c_attn"]
    assert document["base_fingerprint"] == weights_fingerprint(base.params)
    assert document["base_fingerprint"].startswith("sha256:") and len(document["base_fingerprint"]) == 7 + 64
    assert document["base_config"] == {
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 16,
        "block_size": 16,
        "vocab_size": 256,
        "dropout": 0.0,
        "bias": True,
    }


def test_adapter_files_hold_no_base_weights_and_are_a_small_fraction_of_the_base(tmp_path):
    base = make_base()
    save_adapter(trained_lora(base), tmp_path)
    tensors, _ = read_adapter(tmp_path)
    assert not any(name.endswith(".weight") for name in tensors)
    adapter_numbers = sum(value.size for value in tensors.values())
    assert adapter_numbers == 2 * R * (C + 3 * C)  # 2 layers of lora_A (r, C) and lora_B (3C, r)
    base_bytes = sum(value.nbytes for value in base.params.values())
    assert (tmp_path / ADAPTER_WEIGHTS).stat().st_size < 0.2 * base_bytes


def test_an_untrained_adapter_is_refused_unless_allow_noop(tmp_path):
    model = add_lora(make_base(), LoraConfig(r=R))
    with pytest.raises(AdapterError, match="allow_noop"):
        save_adapter(model, tmp_path / "refused")
    assert not (tmp_path / "refused" / ADAPTER_WEIGHTS).exists()
    save_adapter(model, tmp_path / "kept", allow_noop=True)
    tensors, _ = read_adapter(tmp_path / "kept")
    assert set(tensors) == LORA_KEYS
    assert all(not np.any(value) for name, value in tensors.items() if name.endswith("lora_B"))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_an_untrained_adapter_with_trainable_biases_is_refused_too(bias, tmp_path):
    model = add_lora(make_base(), LoraConfig(r=R, bias=bias))  # every lora_B zero, biases equal to the base's
    with pytest.raises(AdapterError, match="allow_noop"):
        save_adapter(model, tmp_path)


def test_saving_a_merged_adapter_is_refused_and_works_after_unmerge(tmp_path):
    model = trained_lora(make_base())
    model.merge()
    with pytest.raises(AdapterError, match="merged"):
        save_adapter(model, tmp_path)
    assert not (tmp_path / ADAPTER_WEIGHTS).exists()
    model.unmerge()
    save_adapter(model, tmp_path)
    assert (tmp_path / ADAPTER_WEIGHTS).is_file()


def test_an_adapter_meeting_another_base_is_refused_unless_explicitly_allowed(tmp_path):
    base = make_base(seed=0)
    model = trained_lora(base)
    save_adapter(model, tmp_path)
    other = make_base(seed=1)
    with pytest.raises(AdapterError, match=r"(?s)fingerprint.*allow_base_mismatch=True"):
        load_adapter(other, tmp_path)
    loaded = load_adapter(other, tmp_path, allow_base_mismatch=True)
    for name in LORA_KEYS:
        assert same_bits(loaded.params[name], model.params[name])
    assert loaded.params["transformer.wte.weight"] is other.params["transformer.wte.weight"]


@pytest.mark.parametrize("allow_base_mismatch", [False, True])
def test_a_base_with_another_config_is_refused_even_when_mismatch_is_allowed(allow_base_mismatch, tmp_path):
    save_adapter(trained_lora(make_base()), tmp_path)
    wider = make_base(config=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    with pytest.raises(AdapterError, match="config"):
        load_adapter(wider, tmp_path, allow_base_mismatch=allow_base_mismatch)


def test_a_misshaped_tensor_is_named_with_both_shapes_and_r(tmp_path):
    base = make_base()
    save_adapter(trained_lora(base), tmp_path / "good")
    tensors, document = read_adapter(tmp_path / "good")
    key = "transformer.h.1.attn.c_attn.lora_B"
    tensors[key] = np.ones((3 * C, R + 1), dtype=np.float32)  # a rank-3 factor in a rank-2 adapter
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / ADAPTER_WEIGHTS).write_bytes(
        safetensors_bytes(tensors, metadata={"minilora_adapter": json.dumps(document)})
    )
    with pytest.raises(AdapterError) as error:
        load_adapter(base, tampered)
    message = str(error.value)
    assert key in message
    assert f"({3 * C}, {R + 1})" in message  # found
    assert f"({3 * C}, {R})" in message  # expected
    assert f"r={R}" in message


def test_a_missing_tensor_is_named(tmp_path):
    base = make_base()
    save_adapter(trained_lora(base), tmp_path / "good")
    tensors, document = read_adapter(tmp_path / "good")
    del tensors["transformer.h.0.attn.c_attn.lora_A"]
    (tmp_path / "short").mkdir()
    save_file(
        tensors,
        str(tmp_path / "short" / ADAPTER_WEIGHTS),
        metadata={"minilora_adapter": json.dumps(document)},
    )
    with pytest.raises(AdapterError, match=r"missing \['transformer\.h\.0\.attn\.c_attn\.lora_A'\]"):
        load_adapter(base, tmp_path / "short")


def test_truncated_files_are_clear_adapter_errors(tmp_path):
    save_adapter(trained_lora(make_base()), tmp_path / "good")
    payload = (tmp_path / "good" / ADAPTER_WEIGHTS).read_bytes()
    for cut in (4, len(payload) // 2, len(payload) - 1):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(payload[:cut])
        with pytest.raises(AdapterError, match="truncated or corrupt"):
            read_adapter(truncated)


def test_safetensors_files_that_are_not_adapters_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(3, dtype=np.float32)}, str(plain))
    with pytest.raises(AdapterError, match="not a minilora adapter"):
        read_adapter(plain)
    base = make_base()
    checkpoint = (
        tmp_path / "checkpoint.safetensors"
    )  # a common mix-up: a base checkpoint given as the adapter
    save_checkpoint(checkpoint, base.params, {"config": CONFIG.to_dict()})
    with pytest.raises(AdapterError, match="not a minilora adapter"):
        load_adapter(base, checkpoint)
    with pytest.raises(AdapterError, match="adapter not found"):
        load_adapter(base, tmp_path / "nowhere")


def test_an_adapter_with_corrupt_metadata_is_a_clear_adapter_error(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    save_file({"x": np.zeros(3, dtype=np.float32)}, str(corrupt), metadata={"minilora_adapter": "{not json"})
    with pytest.raises(AdapterError, match="corrupt.safetensors"):
        read_adapter(corrupt)


def test_a_crash_half_way_through_a_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    base = make_base()
    model = trained_lora(base, steps=2)
    save_adapter(model, tmp_path)
    first = {name: model.params[name].copy() for name in LORA_KEYS}
    first_json = (tmp_path / ADAPTER_CONFIG).read_text()

    optimizer = AdamW(model.params, model.trainable_names, lr=1e-2)  # train on: the next save differs
    idx, targets = batch(seed=7)
    optimizer.step(model.backward(model.forward(idx, targets)[2]))
    assert not same_bits(
        model.params["transformer.h.0.attn.c_attn.lora_B"], first["transformer.h.0.attn.c_attn.lora_B"]
    )

    real_write_all = minilora.io.checkpoint.write_all
    calls = []

    def crash_half_way(fd, payload):
        calls.append(len(payload))
        real_write_all(fd, payload[: len(payload) // 2])
        raise OSError("simulated crash half-way through the write")

    monkeypatch.setattr(minilora.io.checkpoint, "write_all", crash_half_way)
    with pytest.raises(OSError, match="simulated crash"):
        save_adapter(model, tmp_path, extra={"training": {"step": 3}})
    monkeypatch.undo()
    assert calls  # the crash did happen inside the write

    loaded = load_adapter(base, tmp_path)
    for name, value in first.items():
        assert same_bits(loaded.params[name], value), name
    assert (tmp_path / ADAPTER_CONFIG).read_text() == first_json
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
    )  # no temp files


def test_fingerprint_is_independent_of_dict_order():
    params = make_base().params
    reordered = dict(reversed(list(params.items())))
    assert list(reordered) != list(params)
    assert weights_fingerprint(reordered) == weights_fingerprint(params)


def test_fingerprint_changes_when_any_single_weight_element_changes():
    params = make_base().params
    original = weights_fingerprint(params)
    rng = np.random.default_rng(0)
    seen = {original}
    for name in params:
        changed = {key: value.copy() for key, value in params.items()}
        flat = changed[name].reshape(-1)
        i = int(rng.integers(flat.size))
        flat[i] = np.nextafter(flat[i], np.float32(np.inf))  # the smallest possible float32 change
        fingerprint = weights_fingerprint(changed)
        assert fingerprint not in seen, f"changing {name}[{i}] did not give a new fingerprint"
        seen.add(fingerprint)
    assert weights_fingerprint(params) == original  # the copies above left the model alone
