"""A Llama written as a Hugging Face checkpoint folder: ``config.json`` and ``model.safetensors``.

What ``transformers.LlamaForCausalLM.from_pretrained(folder)`` loads: the config in Hugging Face's
field names, and every tensor under its Hugging Face name in ``torch.nn.Linear``'s layout, which is
(C_out, C_in), the transpose of minilora's (C_in, C_out):

    model.layers.0.self_attn.q_proj.weight     minilora (C, C)      -> file (C, C)^T
    model.embed_tokens.weight                  minilora (V, C)      -> file (V, C), as is
    lm_head.weight (only when not tied)        minilora (C, V)      -> file (V, C)

A matrix held quantized is written dequantized, so a merged QLoRA model (the dequantized base plus
the adapter folded in, ``LoraModel.merge_and_unload``) becomes an ordinary dense checkpoint, in
float32 or float16. The tokenizer is not written: it is the base model's own. The folder also holds
minilora's manifest (``.minilora-output.json``), which transformers ignores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save as safetensors_bytes

from ..llama import EMBED, Llama
from .checkpoint import atomic_write_bytes
from .run_folder import write_output_folder

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_DTYPES = {"float32": np.float32, "float16": np.float16}


def hf_llama_config(model: Llama, dtype: str) -> dict:
    """The model's config in Hugging Face's LlamaConfig field names."""
    config = model.config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_size,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }


def hf_tensor(name: str, value, dtype) -> np.ndarray:
    """One parameter in the file's layout and dtype: matrices other than the embedding transposed."""
    array = np.asarray(value)  # a quantized weight dequantizes here; a device array comes to the host
    if array.ndim == 2 and name != EMBED:
        array = array.T
    return np.ascontiguousarray(array, dtype=dtype)


def save_hf_llama(model: Llama, directory, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write ``model`` (a plain Llama: merge an adapter first) as a Hugging Face checkpoint folder.

    The folder is written whole (run_folder.write_output_folder): weights and config are renamed
    into place together, so no crash leaves float16 weights beside a float32 config. A folder
    there already is replaced only with ``overwrite``, and only if an earlier merge wrote it.
    """
    if model.config.family != "llama" or model.has_adapters:
        raise ValueError(
            f"save_hf_llama writes a plain Llama, got {type(model).__name__}: merge_and_unload() first"
        )
    if dtype not in HF_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(HF_DTYPES)}, got {dtype!r}")
    if model.config.rope_pairing != "half":
        raise ValueError(
            "this Llama keeps GGUF's adjacent-pair q/k rows; Hugging Face's are rotate-half: "
            "build it with rope_pairing='half' to export it"
        )
    tensors = {name: hf_tensor(name, value, HF_DTYPES[dtype]) for name, value in model.params.items()}
    config = json.dumps(hf_llama_config(model, dtype), indent=2) + "\n"

    def write(folder: Path) -> None:
        atomic_write_bytes(folder / HF_WEIGHTS, safetensors_bytes(tensors, metadata={"format": "pt"}))
        atomic_write_bytes(folder / HF_CONFIG, config.encode())

    write_output_folder(directory, write, "merge", overwrite)
    return Path(directory)
