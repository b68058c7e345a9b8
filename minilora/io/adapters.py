"""Adapter files: only the adapter, tied to the base it was trained on.

An adapter directory holds ``adapter.safetensors`` (lora_A, lora_B and any trained biases, named as
in the model) and ``adapter_config.json`` (format, variant, the LoraConfig, the adapted modules, the
base model's config and a fingerprint of its weights). The same JSON sits in the safetensors
file's metadata, which is the authority; the JSON file is for people. Both are written atomically.

An adapter is a difference to one particular base: applied to another base it silently computes
nonsense. So the base's fingerprint (backend.weights_fingerprint, a SHA-256 of its weights,
taken when the adapter was added) is stored, and loading onto a base with another fingerprint is
refused unless explicitly allowed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save as safetensors_bytes

from ..backend import device_of, to_device, to_numpy
from ..lora.config import LoraConfig
from ..lora.model import LoraModel, as_plain_lora, lora_model_over
from ..lora.variants import variant_for
from .checkpoint import atomic_write_bytes
from .json_text import parse_json_object
from .safetensors_read import read_tensors

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "minilora-adapter"
FORMAT_VERSION = 1
METADATA_KEY = "minilora_adapter"
REQUIRED_FIELDS = ("variant", "lora_config", "scaling", "base_config", "base_fingerprint")


class AdapterError(ValueError):
    """An adapter file is missing, malformed, or does not fit the base; the message says how."""


def save_adapter(model: LoraModel, directory, allow_noop: bool = False, extra: dict | None = None) -> Path:
    """Write the active adapter of ``model`` to ``directory``; returns the weights file's path.

    A PiSSA adapter is written as the equivalent plain LoRA of rank 2r (at most min(C_in, C_out))
    against the original base (lora_model.as_plain_lora), so that it loads onto that base like any other adapter.
    ``extra`` adds entries to the JSON document (training metrics, provenance).
    """
    if model.merged:
        raise AdapterError("the adapter is merged into the weights; unmerge() before saving it")
    if model.active_adapter is None:
        raise AdapterError("no adapter is active: there is nothing to save")
    adapter = model.adapter
    if not allow_noop and model.is_noop():
        raise AdapterError(
            "every lora_B is zero and every trained bias equals the base's, so the adapter "
            "changes nothing (it was never trained); pass allow_noop=True to save it anyway"
        )
    config, tensors = adapter.config, {name: adapter.tensors[name] for name in adapter.trainable}
    converted = {}
    if config.init == "pissa":
        config, tensors = as_plain_lora(adapter)
        converted = {"converted_from": "pissa"}
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": variant_for(config).name,
        "lora_config": config.to_dict(),
        "scaling": config.scaling,
        "adapted_modules": {name: list(shape) for name, shape in adapter.modules.items()},
        "base_config": model.config.to_dict(),
        "base_fingerprint": model.base_fingerprint,
        **converted,
        **(extra or {}),
    }
    text = json.dumps(document, indent=2, sort_keys=True)
    directory = Path(directory)
    weights = directory / ADAPTER_WEIGHTS
    # C order: safetensors' NumPy writer stores a transposed (Fortran-order) array's buffer as is
    host_tensors = {name: np.ascontiguousarray(to_numpy(value)) for name, value in tensors.items()}
    atomic_write_bytes(weights, safetensors_bytes(host_tensors, metadata={METADATA_KEY: text}))
    atomic_write_bytes(directory / ADAPTER_CONFIG, (text + "\n").encode())
    return weights


def read_adapter(path) -> tuple[dict, dict]:
    """The tensors (host arrays) and the JSON document of an adapter directory or weights file."""
    path = Path(path)
    weights = path / ADAPTER_WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise AdapterError(f"adapter not found: {weights}")
    tensors, header = read_tensors(weights, AdapterError, "adapter")  # BF16 as float32; F8 refused, by name
    if METADATA_KEY not in header:
        raise AdapterError(f"{weights} is not a minilora adapter (no {METADATA_KEY!r} metadata)")
    document = parse_json_object(header[METADATA_KEY], f"{weights}: the adapter's metadata", AdapterError)
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"{weights}: unsupported adapter format {document.get('format')!r} "
            f"version {document.get('format_version')!r}"
        )
    missing = [key for key in REQUIRED_FIELDS if key not in document]
    if missing:
        raise AdapterError(f"{weights}: the adapter's metadata lacks {missing}")
    for key, kind in (
        ("lora_config", dict),
        ("base_config", dict),
        ("base_fingerprint", str),
        ("variant", str),
    ):
        if not isinstance(document[key], kind):
            raise AdapterError(
                f"{weights}: the adapter's {key} must be a {kind.__name__}, got {document[key]!r}"
            )
    return tensors, document


def install_adapter(
    lora_model: LoraModel,
    adapter_name: str,
    lora_config: LoraConfig,
    tensors: dict,
    source,
    describe_key=repr,
) -> None:
    """Add ``adapter_name`` with ``lora_config`` to ``lora_model`` and fill it with ``tensors`` (host arrays).

    Every key and shape is checked first; on a mismatch the adapter is removed again and the error
    names the key (as ``describe_key`` writes it), both shapes and r.
    """
    lora_model.add_adapter(adapter_name, lora_config)
    adapter = lora_model.adapters[adapter_name]
    missing = sorted(set(adapter.trainable) - set(tensors))
    unexpected = sorted(set(tensors) - set(adapter.trainable))
    problem = None
    if missing or unexpected:
        problem = f"adapter keys do not match its config: missing {missing}, unexpected {unexpected}"
    for name, value in tensors.items():
        expected = tuple(adapter.tensors[name].shape) if name in adapter.tensors else None
        if problem is None and tuple(value.shape) != expected:
            problem = (
                f"adapter tensor {describe_key(name)} has shape {tuple(value.shape)}, expected {expected} "
                f"for r={lora_config.r}"
            )
    if problem is not None:
        lora_model.delete_adapter(adapter_name)
        raise AdapterError(f"{source}: {problem}")
    reference = lora_model.dense_reference()
    for name, value in tensors.items():  # each in the dtype add_adapter gave it (float32 over float16)
        adapter.tensors[name] = to_device(value.astype(adapter.tensors[name].dtype), device_of(reference))


def load_adapter(model, path, adapter_name: str = "default", allow_base_mismatch: bool = False) -> LoraModel:
    """Load the adapter at ``path`` onto ``model`` and make it active; every key, shape and the base are checked.

    ``model`` is a base GPT (a new LoraGPT over its weights is returned) or a LoraGPT, which gets the
    adapter under ``adapter_name`` next to the ones it has.
    """
    tensors, document = read_adapter(path)
    if document["variant"] not in ("lora", "dora"):
        raise AdapterError(f"{path}: adapter variant {document['variant']!r} is not supported")
    made_for, this_base = dict(document["base_config"]), model.config.to_dict()
    if not model.context_in_weights:  # a Llama's context length is a setting, not part of its weights
        made_for.pop("block_size", None), this_base.pop("block_size")
    if made_for != this_base:
        raise AdapterError(
            f"{path}: the adapter was made for a model with config {document['base_config']}, "
            f"this base has {model.config.to_dict()}"
        )
    lora_model = lora_model_over(model)
    fingerprint = lora_model.base_fingerprint
    if fingerprint != document["base_fingerprint"] and not allow_base_mismatch:
        raise AdapterError(
            f"{path}: the adapter was trained on another base (fingerprint "
            f"{document['base_fingerprint'][:19]}..., this base is {fingerprint[:19]}...); "
            "pass allow_base_mismatch=True (--allow-base-mismatch) to load it anyway"
        )
    install_adapter(lora_model, adapter_name, LoraConfig.from_dict(document["lora_config"]), tensors, path)
    lora_model.set_adapter(adapter_name)
    return lora_model
