"""Adapters in Hugging Face PEFT's format, so that PEFT loads ours and we load PEFT's.

PEFT saves a LoRA adapter as ``adapter_config.json`` and ``adapter_model.safetensors``. For a GPT-2
(whose linear layers are ``Conv1D``, weight (C_in, C_out)) the tensors are

    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight         (r, C_in)
    base_model.model.transformer.h.0.attn.c_attn.lora_B.weight         (C_out, r)
    base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector (C_out,)   DoRA only

which is exactly minilora's layout and math, with ``fan_in_fan_out: true`` telling PEFT that the
base weight is stored (C_in, C_out). A Llama's modules are ``torch.nn.Linear`` in Hugging Face, so its
adapters say ``fan_in_fan_out: false``; the factors have the same shapes either way
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` is (r, C_in)).
Exporting is renaming plus a config; importing is the reverse,
with a check of every key and shape. PEFT files carry no fingerprint of their base, so an imported
adapter is trusted to belong to the base it is loaded onto. Only what both sides express is
supported: no trained biases, no per-module rank or alpha patterns.

No PyTorch here: the files are plain safetensors and JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import save as safetensors_bytes

from ..backend import to_numpy
from ..lora.config import LoraConfig
from ..lora.model import LoraModel, as_plain_lora, lora_model_over
from .adapters import AdapterError, install_adapter
from .checkpoint import atomic_write_bytes
from .json_text import read_json_object
from .run_folder import write_output_folder
from .safetensors_read import read_tensors

PEFT_CONFIG = "adapter_config.json"
# PEFT starts that replace the base's weights (PiSSA, OLoRA, CorDA's residuals, LoftQ's quantized base)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
KEEPS_THE_BASE = (True, False, "gaussian", "eva", "orthogonal", "mica")  # only the factors differ
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_key(name: str) -> str:
    """minilora's tensor name -> PEFT's: the prefix, and ``.weight`` after lora_A / lora_B."""
    return PREFIX + (name + ".weight" if name.endswith((".lora_A", ".lora_B")) else name)


def minilora_key(key: str) -> str:
    """PEFT's tensor name -> minilora's."""
    if not key.startswith(PREFIX):
        raise AdapterError(f"unexpected key {key!r} in a PEFT adapter (expected the prefix {PREFIX!r})")
    name = key[len(PREFIX) :]
    return name[: -len(".weight")] if name.endswith((".lora_A.weight", ".lora_B.weight")) else name


def export_peft(model: LoraModel, directory, overwrite: bool = False) -> Path:
    """Write the active adapter in PEFT's format (a PiSSA adapter as its equivalent rank-2r LoRA).

    The two files are written into a temporary folder renamed whole into ``directory``
    (run_folder.write_output_folder), so new weights never meet an old config. A folder there
    already is replaced only with ``overwrite``, and only if an earlier export-peft wrote it.
    """
    adapter = model.adapter
    config, tensors = adapter.config, {name: adapter.tensors[name] for name in adapter.trainable}
    if config.init == "pissa":
        config, tensors = as_plain_lora(adapter)
    if config.bias != "none":
        raise AdapterError(
            f"bias={config.bias!r} has no agreed PEFT layout here; export adapters with bias='none'"
        )
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "fan_in_fan_out": model.peft_fan_in_fan_out,
        "bias": "none",
        "target_modules": sorted(adapter.modules),  # the exact modules: PEFT matches a full name to itself
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    host = {peft_key(name): to_numpy(value) for name, value in tensors.items()}

    def write(folder: Path) -> None:
        atomic_write_bytes(folder / PEFT_WEIGHTS, safetensors_bytes(host, metadata={"format": "pt"}))
        atomic_write_bytes(
            folder / PEFT_CONFIG, (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode()
        )

    write_output_folder(directory, write, "export-peft", overwrite)
    return Path(directory) / PEFT_WEIGHTS


def read_peft(directory) -> tuple[dict, dict]:
    """PEFT's config dict and its tensors under minilora's names (host arrays; BF16 read as float32)."""
    directory = Path(directory)
    config_path, weights_path = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"not a PEFT adapter directory: {path} is missing")
    config = read_json_object(config_path, AdapterError)
    tensors, _ = read_tensors(weights_path, AdapterError, "PEFT adapter")
    return config, {minilora_key(key): value for key, value in tensors.items()}


def lora_config_from_peft(peft_config: dict, modules: list, conv1d: bool = True) -> LoraConfig:
    """The LoraConfig of a PEFT LoRA config, refusing what minilora cannot represent."""
    if peft_config.get("peft_type") != "LORA":
        raise AdapterError(
            f"only PEFT LoRA adapters can be imported, this one is {peft_config.get('peft_type')!r}"
        )
    for field in ("rank_pattern", "alpha_pattern"):
        if peft_config.get(field):
            raise AdapterError(f"PEFT's {field} (a rank or alpha per module) is not supported")
    if peft_config.get("bias", "none") != "none" or peft_config.get("modules_to_save"):
        raise AdapterError("PEFT adapters with trained biases or modules_to_save are not supported")
    fan_in_fan_out = peft_config.get("fan_in_fan_out", False)
    if not isinstance(fan_in_fan_out, bool):  # the string "false" would read as true
        raise AdapterError(f"fan_in_fan_out must be true or false, got {fan_in_fan_out!r}")
    if fan_in_fan_out != conv1d:
        raise AdapterError(
            f"the PEFT adapter has fan_in_fan_out {fan_in_fan_out}, but this "
            + (
                "GPT-2's Conv1D weights are (C_in, C_out): it needs true"
                if conv1d
                else "Llama's are nn.Linear: it needs false"
            )
        )
    missing = [key for key in ("r", "lora_alpha") if key not in peft_config]
    if missing:
        raise AdapterError(f"the PEFT config lacks {missing}")
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise AdapterError(
            f"the PEFT adapter has init_lora_weights {init!r}, which changed the base's weights as it "
            "started: on the original base it computes something else. Convert it in PEFT first "
            "(save_pretrained with path_initial_model_for_weight_conversion), then import that"
        )
    if init not in KEEPS_THE_BASE:
        raise AdapterError(f"the PEFT adapter's init_lora_weights {init!r} is not one minilora knows")
    return LoraConfig(  # each value is checked by LoraConfig: r 4.9 or use_rslora "false" are refused
        r=peft_config["r"],
        lora_alpha=peft_config["lora_alpha"],
        lora_dropout=peft_config.get("lora_dropout", 0.0),
        target_modules=tuple(modules),
        use_rslora=peft_config.get("use_rslora", False),
        use_dora=peft_config.get("use_dora", False),
    )


def import_peft(model, directory, adapter_name: str = "default") -> LoraModel:
    """Load a PEFT LoRA (or DoRA) adapter onto a minilora base (a GPT or a LoraGPT) and activate it."""
    peft_config, tensors = read_peft(directory)
    adaptable = model.config.linear_modules()
    modules = sorted({name.rsplit(".", 1)[0] for name in tensors})
    unknown = [m for m in modules if m not in adaptable]
    if unknown:
        raise AdapterError(f"{directory}: the adapter targets {unknown}, which this model does not have")
    try:
        lora_config = lora_config_from_peft(peft_config, modules, model.peft_fan_in_fan_out)
    except ValueError as err:  # AdapterError or LoraConfig's own: say which file it is about
        raise AdapterError(f"{Path(directory) / PEFT_CONFIG}: {err}") from None
    lora_model = lora_model_over(model)
    install_adapter(
        lora_model, adapter_name, lora_config, tensors, directory, describe_key=lambda n: repr(peft_key(n))
    )
    lora_model.set_adapter(adapter_name)
    return lora_model
