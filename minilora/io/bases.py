"""Base models by name or path, each with the tokenizer its ids belong to: what ``--base`` accepts.

- nothing given: the shipped Shakespeare base (data/shakespeare_base.safetensors), byte-level;
- ``"smollm2"``: SmolLM2-135M-Instruct, fetched and verified on first use (smollm2.py), read from
  its GGUF file into minilora's Llama in Hugging Face's layout (llama_gguf.py), held in float32,
  with its byte-level BPE tokenizer (bpe.py);
- any other value: a minilora checkpoint file, or a run directory holding one, byte-level.

``Base.name`` is what a run records as its base (an adapter's ``training.base``): the word
``smollm2``, ``data/shakespeare_base.safetensors`` for the shipped base (wherever the checkout is),
or the checkpoint's path as given. An adapter is tied to its base's weights by the fingerprint in
its file, so it loads onto the same base however that base is named.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import GPTConfig
from ..llama import LlamaConfig
from .checkpoint import load_model, resolve_checkpoint_path
from .data import SHIPPED_BASE
from .tokenizer import ByteTokenizer

SMOLLM2 = "smollm2"
SMOLLM2_CONTEXT = 2048  # positions for generation and chat (SmolLM2 was trained on 8192)


@dataclass(frozen=True)
class Base:
    name: str  # see the module docstring
    model: object  # a GPT or a Llama, float32
    tokenizer: object  # ByteTokenizer or BPETokenizer: encode, decode, token_byte_lengths

    @property
    def is_byte_level(self) -> bool:
        return isinstance(self.tokenizer, ByteTokenizer)


def base_family(spec: str | None) -> type:
    """The config class of the family ``spec`` names, known before any weight is read.

    SmolLM2 is a Llama; every checkpoint minilora reads is a GPT. The command line takes the family's
    fine-tuning defaults from it (``default_lora_targets``, ``default_eval_windows``).
    """
    return LlamaConfig if spec == SMOLLM2 else GPTConfig


def base_file(spec: str | None):
    """The file ``load_base(spec)`` reads: the shipped base or a checkpoint; None for smollm2 (fetched later)."""
    if spec == SMOLLM2:
        return None
    return resolve_checkpoint_path(SHIPPED_BASE if spec is None else spec)


def load_base(spec: str | None = None, device: str | None = None, block_size: int | None = None,
              quantized: str | None = None) -> Base:  # fmt: skip
    """The base named by ``spec`` (see the module docstring) on ``device``.

    ``block_size`` sets SmolLM2's context (the length of training windows, of the key/value cache);
    a checkpoint's context is fixed by its position table, so there it must be left out.
    ``quantized`` keeps SmolLM2's matrices frozen in blocks (QLoRA): "gguf", the file's own Q4_1 and
    Q8_0; "q4_1", "q8_0" or "nf4", every matrix re-quantized to that format (io/llama_gguf.py).
    """
    if spec == SMOLLM2:
        from .bpe import BPETokenizer
        from .llama_gguf import llama_from_gguf
        from .smollm2 import fetch_smollm2

        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        path = fetch_smollm2()
        model = llama_from_gguf(
            path, block_size=block_size or SMOLLM2_CONTEXT, device=device, quantize=quantized
        )
        return Base(SMOLLM2, model, BPETokenizer.from_gguf(path))
    if quantized is not None:
        raise ValueError(
            f"a quantized base ({quantized}) is SmolLM2's (--base smollm2), not a GPT checkpoint's"
        )
    path = resolve_checkpoint_path(SHIPPED_BASE if spec is None else spec)
    name = f"data/{SHIPPED_BASE.name}" if spec is None else str(path)
    model = load_model(path, device)
    if block_size is not None and block_size != model.config.block_size:
        raise ValueError(
            f"a block size of {block_size} was asked for, but {path} is a GPT whose context is fixed "
            f"at {model.config.block_size} positions by its position table (only --base smollm2 takes one)"
        )
    return Base(name, model, ByteTokenizer())
