"""A minilora Llama built from a llama GGUF file: the config, the weights renamed and transposed.

``load_gguf`` (gguf_file.py) gives GGUF's names and layout; this module maps each tensor to the
Hugging Face name the Llama model uses and to minilora's (C_in, C_out) layout:

    token_embd.weight         -> model.embed_tokens.weight                 (V, C), as is
    blk.N.attn_norm.weight    -> model.layers.N.input_layernorm.weight     (C,)
    blk.N.attn_q/k/v.weight   -> model.layers.N.self_attn.q/k/v_proj.weight transposed
    blk.N.attn_output.weight  -> model.layers.N.self_attn.o_proj.weight     transposed
    blk.N.ffn_norm.weight     -> model.layers.N.post_attention_layernorm.weight
    blk.N.ffn_gate/up/down    -> model.layers.N.mlp.gate/up/down_proj.weight transposed
    output_norm.weight        -> model.norm.weight
    output.weight             -> lm_head.weight (transposed), when the head is not tied

llama.cpp's converter stored q's and k's rows in the order of GGML's adjacent-pair RoPE. The model
can be built either way, with the same logits:

- ``rope_pairing="half"`` (the default) undoes that permutation, so the weights are exactly Hugging
  Face's and RoPE rotates the pairs (j, j + hs/2). An adapter trained on this model is an adapter of
  Hugging Face's SmolLM2: its PEFT export loads onto transformers' model as it is.
- ``rope_pairing="adjacent"`` keeps the file's order and rotates the pairs (2j, 2j + 1), as llama.cpp.
"""

from __future__ import annotations

import os

import numpy as np

from ..backend import to_device
from ..llama import EMBED, HEAD, NORM, Llama, LlamaConfig
from ..quant import QUANTIZED_FORMATS, quantize_weight, quantized_from_gguf
from .gguf_file import GGUFError, load_gguf, load_gguf_blocks

BLOCK_TENSORS = {  # GGUF's name in a block -> (the Llama parameter in that block, transposed?)
    "attn_norm.weight": ("input_layernorm.weight", False),
    "attn_q.weight": ("self_attn.q_proj.weight", True),
    "attn_k.weight": ("self_attn.k_proj.weight", True),
    "attn_v.weight": ("self_attn.v_proj.weight", True),
    "attn_output.weight": ("self_attn.o_proj.weight", True),
    "ffn_norm.weight": ("post_attention_layernorm.weight", False),
    "ffn_gate.weight": ("mlp.gate_proj.weight", True),
    "ffn_up.weight": ("mlp.up_proj.weight", True),
    "ffn_down.weight": ("mlp.down_proj.weight", True),
}


def llama_parameter_name(gguf_name: str) -> tuple[str, bool]:
    """The Llama parameter a GGUF tensor becomes, and whether it is transposed on the way."""
    if gguf_name == "token_embd.weight":
        return EMBED, False
    if gguf_name == "output_norm.weight":
        return f"{NORM}.weight", False
    if gguf_name == "output.weight":
        return f"{HEAD}.weight", True
    parts = gguf_name.split(".", 2)  # "blk", "N", the rest
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_TENSORS:
        name, transposed = BLOCK_TENSORS[parts[2]]
        return f"model.layers.{int(parts[1])}.{name}", transposed
    raise GGUFError(f"the GGUF tensor {gguf_name!r} has no place in a Llama model")


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of a q or k projection (C_out, C_in): rows back to rotate-half order.

    Within each head of hs rows, the file's row 2j + s holds Hugging Face's row s * hs/2 + j (the
    converter reshaped the rows to (heads, 2, hs/2) and swapped the last two axes); this swaps back.
    """
    C_out = weight.shape[0]
    hs = C_out // n_heads
    return weight.reshape(n_heads, hs // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def llama_from_gguf(path: str | os.PathLike, block_size: int | None = None, dtype=np.float32,
                    device: str | None = None, rope_pairing: str = "half",
                    quantize: str | None = None) -> Llama:  # fmt: skip
    """The Llama model of a llama GGUF file, in ``dtype`` on ``device``.

    ``block_size`` caps the context (the key/value cache of generation is that long); by default
    the file's context length. ``rope_pairing``: see the module docstring. ``quantize`` keeps every
    matrix (the projections and the token embedding) held quantized, frozen, for QLoRA: "gguf" in
    the file's own blocks (no re-quantization: SmolLM2 ships Q4_1 projections and a Q8_0 embedding);
    "q4_1", "q8_0" or "nf4", every matrix re-quantized from the file's values to that one format.
    The norms stay float32. None (the default) dequantizes everything to ``dtype``.
    """
    if rope_pairing not in ("half", "adjacent"):
        raise ValueError(f"rope_pairing must be 'half' or 'adjacent', got {rope_pairing!r}")
    if quantize not in (None, *QUANTIZED_FORMATS):
        raise ValueError(f"quantize must be None or one of {QUANTIZED_FORMATS}, got {quantize!r}")
    values, tensors = load_gguf_blocks(path) if quantize == "gguf" else load_gguf(path)
    if values["rope_dim"] != values["head_size"]:
        raise GGUFError(f"RoPE on {values['rope_dim']} of {values['head_size']} channels is not supported")
    config = LlamaConfig(
        n_layer=int(values["n_layer"]), n_head=int(values["n_head"]), n_kv_head=int(values["n_kv_head"]),
        n_embd=int(values["n_embd"]), ffn_hidden=int(values["n_inner"]), vocab_size=int(values["vocab_size"]),
        block_size=int(block_size or values["block_size"]), rope_theta=float(values["rope_theta"]),
        rms_eps=float(values["rms_norm_eps"]), rope_pairing=rope_pairing,
        tie_embeddings=bool(values["tie_word_embeddings"]),
    )  # fmt: skip
    heads = {"attn_q.weight": config.n_head, "attn_k.weight": config.n_kv_head}
    params = {}
    for gguf_name, entry in tensors.items():
        name, transposed = llama_parameter_name(gguf_name)
        block_format, array, shape = entry if quantize == "gguf" else (None, entry, entry.shape)
        n_heads = heads.get(gguf_name.split(".", 2)[-1])
        if rope_pairing == "half" and n_heads is not None:
            array = unpermute_rope_rows(array, n_heads)  # whole rows: a row of blocks moves as one
        if block_format is None and (quantize is None or array.ndim == 1):  # float32 (norms always)
            array = np.ascontiguousarray(array.T if transposed else array, dtype=dtype)
            params[name] = to_device(array, device)
            continue
        layout = "linear" if transposed else "table"  # stored (C_out, C_in), or the (V, C) embedding
        if block_format is None:  # re-quantized from the file's values to one format
            weight = quantize_weight(array, quantize, layout)
        else:
            weight = quantized_from_gguf(array, block_format, *shape, layout)
        params[name] = weight.map_arrays(lambda a: to_device(a, device))
    return Llama(config, params)
