"""Reading a GGUF file: its metadata as a dict, a llama model's config, its tensors as float32 arrays.

GGUF is llama.cpp's one-file format: typed key-value metadata (the architecture's hyper-parameters,
the tokenizer's vocabulary and merges, the chat template), a table of tensors (name, shape, type,
offset), then the tensor data. The `gguf` package, llama.cpp's own reader (`pip install
'minilora[llm]'`), memory-maps the file and dequantises it into NumPy; this module names what it
finds. The file is SmolLM2-135M-Instruct's (io/smollm2.py fetches it), but any llama-architecture
GGUF reads the same way.

Quantisation, in the two types that file uses. A row of a tensor is cut into blocks of 32
consecutive values; each block is stored as float16 constants and 32 small integers q:
- Q8_0, 34 bytes a block: the scale d (float16), then 32 int8 q; value = d * q.
- Q4_1, 20 bytes a block: the scale d and the minimum m (float16 each), then 16 bytes holding 32
  unsigned 4-bit q, value j in the low nibble of byte j and value j + 16 in its high nibble;
  value = d * q + m.
The float32 values returned are exactly the weights llama.cpp computes with: dequantising loses
nothing more (what 4-bit rounding lost against the original bfloat16 weights is gone for good).

Shapes. GGUF lists dimensions fastest-varying first (ggml's ne[0], ne[1], ...): the file gives the
token embedding as [576, 49152]. NumPy's row-major shape lists the slowest first, so every shape
here is the file's reversed, and token_embd.weight is (V, C) = (49152, 576), one row per token.
A projection's weight is (C_out, C_in), the PyTorch nn.Linear layout, y = x @ W.T, not the
GPT-2 Conv1D layout (C_in, C_out) of minilora's own parameters: a model built on these tensors
transposes them. The tensors of a llama model, for SmolLM2-135M (C 576, H 9 query heads, H_kv 3
key/value heads, hs 64, F 1536 feed-forward channels, V 49152, N 0..29):

    token_embd.weight        (V, C)          Q8_0  token embedding; also the output head (no output.weight)
    blk.N.attn_norm.weight   (C,)            F32   RMSNorm gain before attention
    blk.N.attn_q.weight      (H * hs, C)     Q4_1  query projection, (576, 576)
    blk.N.attn_k.weight      (H_kv * hs, C)  Q4_1  key projection, (192, 576)
    blk.N.attn_v.weight      (H_kv * hs, C)  Q4_1  value projection, (192, 576)
    blk.N.attn_output.weight (C, H * hs)     Q4_1  attention output projection, (576, 576)
    blk.N.ffn_norm.weight    (C,)            F32   RMSNorm gain before the feed-forward
    blk.N.ffn_gate.weight    (F, C)          Q4_1  SwiGLU gate, (1536, 576)
    blk.N.ffn_up.weight      (F, C)          Q4_1  SwiGLU up projection, (1536, 576)
    blk.N.ffn_down.weight    (C, F)          Q4_1  SwiGLU down projection, (576, 1536)
    output_norm.weight       (C,)            F32   final RMSNorm gain

llama.cpp's converter reorders the rows of attn_q and attn_k within each head: the pair of rows
that Hugging Face's rotate-half RoPE turns together, (i, i + hs/2), is stored as rows (2i, 2i + 1).
These weights therefore need GGML's RoPE, which rotates adjacent pairs.

What this leaves out: writing GGUF, architectures other than llama. ``load_gguf`` makes everything
float32 (538 MB for SmolLM2-135M); ``load_gguf_blocks`` keeps the quantised tensors' bytes, which
minilora.quant multiplies by without dequantising them whole.
"""

import os
from pathlib import Path

import numpy as np

from ..validate import check_int

# The config's keys, each read from the metadata key "llama." + the name on the right.
LLAMA_CONFIG_KEYS = {
    "n_layer": "block_count",  # transformer blocks
    "n_embd": "embedding_length",  # channels of the residual stream (C)
    "n_head": "attention.head_count",  # query heads (H)
    "n_kv_head": "attention.head_count_kv",  # key/value heads (H_kv), shared by H / H_kv query heads each
    "n_inner": "feed_forward_length",  # hidden channels of the SwiGLU feed-forward (F)
    "block_size": "context_length",  # longest context the model was trained for (T max)
    "rope_theta": "rope.freq_base",  # RoPE base: pair i turns by position * theta ** (-2i / hs)
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",  # epsilon inside every RMSNorm's square root
}


# What gguf's reader raises on a header it cannot follow: a count or a length that runs past the end
# (IndexError from an empty slice of the memory map), a duplicated key (KeyError), bytes that are not
# a valid type or string (ValueError, UnicodeDecodeError among them), a size that overflows.
READER_FAILURES = (ValueError, IndexError, KeyError, OverflowError, MemoryError)


LLAMA_COUNTS = ("n_layer", "n_embd", "n_head", "n_kv_head", "n_inner", "block_size")  # integers >= 1


class GGUFError(ValueError):
    """A file is not a GGUF file minilora can read; the message names the file and the problem."""


def corrupt(path: Path, err: Exception) -> GGUFError:
    """The one-line error for a GGUF file whose header or tensor table gguf's reader could not follow."""
    size = path.stat().st_size
    return GGUFError(
        f"{path} is not a GGUF file gguf can read: it is truncated or corrupt ({size:,} bytes; "
        f"{type(err).__name__}: {err})"
    )


def import_gguf():
    """The `gguf` package, or an ImportError that says how to install it."""
    try:
        import gguf
    except ImportError as err:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'minilora[llm]'") from err
    return gguf


def open_gguf(path: str | os.PathLike):
    """A gguf.GGUFReader on path (a memory map: tensor data is read only when touched)."""
    gguf = import_gguf()
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"no such GGUF file: {path}")
    try:
        return gguf.GGUFReader(path)
    except READER_FAILURES as err:  # the magic number, the version, or a header it cannot follow
        raise corrupt(path, err) from err


def read_gguf(path: str | os.PathLike):
    """An open reader on ``path`` and the file's metadata (metadata_of); GGUFError naming the file if either fails."""
    path = Path(path)
    reader = open_gguf(path)
    try:
        return reader, metadata_of(reader)
    except READER_FAILURES as err:  # a string that is not UTF-8, a value of a type gguf does not know
        raise corrupt(path, err) from err


def metadata_of(reader) -> dict:
    """Every metadata key of an open reader with its value as Python str, int, float, bool or list."""
    return {name: field.contents() for name, field in reader.fields.items()}


def read_gguf_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a GGUF file, keys as in the file ("llama.block_count", "tokenizer.ggml.tokens")."""
    return read_gguf(path)[1]


def llama_config(metadata: dict) -> dict:
    """The model's shape from a llama GGUF's metadata, under the names of LLAMA_CONFIG_KEYS.

    Adds head_size (n_embd / n_head), rope_dim (how many channels of each head RoPE rotates; all of
    them unless the file says otherwise), vocab_size (the number of tokens in the tokenizer's
    vocabulary) and name (general.name). Floats are the float32 values the file stores:
    rms_norm_eps is 1e-5 rounded to float32.
    """
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise GGUFError(f"general.architecture is {architecture!r}; only 'llama' models are supported")
    missing = [f"llama.{key}" for key in LLAMA_CONFIG_KEYS.values() if f"llama.{key}" not in metadata]
    if "tokenizer.ggml.tokens" not in metadata:
        missing.append("tokenizer.ggml.tokens")
    if missing:
        raise GGUFError(f"the GGUF metadata lacks {missing}, needed for the model's config")
    config = {name: metadata[f"llama.{key}"] for name, key in LLAMA_CONFIG_KEYS.items()}
    for name in LLAMA_COUNTS:  # before anything divides by them
        try:
            config[name] = check_int(f"llama.{LLAMA_CONFIG_KEYS[name]}", config[name], minimum=1)
        except ValueError as err:
            raise GGUFError(f"the GGUF metadata's {err}") from None
    config["head_size"] = config["n_embd"] // config["n_head"]
    config["rope_dim"] = metadata.get("llama.rope.dimension_count", config["head_size"])
    config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    config["name"] = metadata.get("general.name", "")
    return config


def file_config(path, metadata: dict) -> dict:
    """llama_config of the file ``path``'s metadata; its GGUFError names the file."""
    try:
        return llama_config(metadata)
    except GGUFError as err:
        raise GGUFError(f"{path}: {err}") from err


def load_gguf_blocks(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[str | None, np.ndarray, tuple]]]:
    """Like load_gguf, but quantized tensors stay as the file stores them.

    Each tensor is (format, array, shape), shape in NumPy order as load_gguf gives it: ("q4_1" or
    "q8_0", its raw bytes (rows, bytes per row) uint8, (rows, values per row)), or (None, float32
    values, their shape) for the float tensors. minilora.quant reads the blocks.
    """
    reader, metadata = read_gguf(path)
    config = file_config(path, metadata)
    tensors = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne[0] (fastest) first
        if kind in ("Q4_1", "Q8_0"):
            tensors[tensor.name] = (kind.lower(), np.array(tensor.data, dtype=np.uint8), shape)  # off the map
        elif kind == "F32":
            tensors[tensor.name] = (None, np.array(tensor.data, dtype=np.float32).reshape(shape), shape)
        else:
            raise GGUFError(f"tensor {tensor.name} is {kind}: only F32, Q4_1 and Q8_0 are read as blocks")
    config["tie_word_embeddings"] = "output.weight" not in tensors
    return config, tensors


def load_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a llama GGUF: its config (llama_config) and every tensor as a float32 NumPy array.

    Tensors keep their GGUF names and come in NumPy order, the file's shape reversed (see the
    module docstring): (C_out, C_in) for projections, (V, C) for the embedding, (C,) for norms.
    The config also says whether the output head is tied to the token embedding: tie_word_embeddings
    is True when the file has no output.weight, and then logits = x @ token_embd.weight.T.
    Each array is a fresh, writable copy; the file is not held open afterwards.
    """
    gguf = import_gguf()
    reader, metadata = read_gguf(path)
    config = file_config(path, metadata)
    tensors = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne[0] (fastest) first
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # float32, blocks expanded
        if np.may_share_memory(values, tensor.data):  # F32 tensors come back as views of the memory map
            values = values.copy()
        tensors[tensor.name] = values.astype(np.float32, copy=False).reshape(shape)
    config["tie_word_embeddings"] = "output.weight" not in tensors
    return config, tensors
