"""The shape of a GPT-2-style model: its configuration, the facts it states about the model, and presets.

Shape letters used throughout minilora: B batch, T time (positions), C channels (n_embd),
V vocabulary, H heads, hs head size (C / H), r LoRA rank.

A config is the family's contract with the rest of minilora (nanoGPT's ``GPTConfig`` says everything
the model needs to know about itself; so does ours, for its consumers too): every parameter's name
and shape (``parameter_shapes``), the linear layers an adapter may target (``linear_modules``),
where block i's names begin (``block_prefix``), the key/value heads a cache keeps (``n_kv_head``)
and the dropout the model applies; and the family's defaults for fine-tuning (``default_lora_targets``,
``default_eval_windows``), which the command line reads where ``--base`` names the family. LoRA, the
accounting, the optimiser, generation and the fast path ask these instead of testing which family they
were handed (llama.py's ``LlamaConfig`` states the same facts for the Llama family).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .validate import ConfigFields, check_bool, check_float, check_int

WTE = "transformer.wte.weight"  # the token embedding, (V, C), tied to the output head
WPE = "transformer.wpe.weight"  # the position table, (T max, C)
GPT_LINEAR_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # each block's linears


@dataclass(frozen=True)
class GPTConfig(ConfigFields):
    n_layer: int = 4  # number of transformer blocks
    n_head: int = 4  # attention heads per block (H); n_embd must be divisible by it
    n_embd: int = 128  # channels of the residual stream (C)
    block_size: int = 128  # longest sequence the model accepts, the size of the position table (T max)
    vocab_size: int = 256  # V; 256 for minilora's byte-level tokenizer
    dropout: float = 0.0  # probability for GPT-2's embedding, attention and residual dropouts
    bias: bool = True  # biases in the linear and LayerNorm layers (GPT-2 has them)

    family: ClassVar[str] = "gpt"  # the family's name, as the fast path's per-family twins know it
    default_lora_targets: ClassVar[tuple[str, ...]] = ("c_attn",)  # finetune --targets unless given (PEFT's)
    default_eval_windows: ClassVar[int] = 64  # finetune --eval-windows unless given (validation windows)

    def __post_init__(self):
        for field in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            object.__setattr__(self, field, check_int(f"GPTConfig.{field}", getattr(self, field), minimum=1))
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        dropout = check_float("GPTConfig.dropout", self.dropout, 0.0, 1.0, high_open=True)
        object.__setattr__(self, "dropout", dropout)
        object.__setattr__(self, "bias", check_bool("GPTConfig.bias", self.bias))

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:
        """Key/value heads per block: one per query head (GPT-2 shares none)."""
        return self.n_head

    def block_prefix(self, i: int) -> str:
        """The names of block i's parameters begin with this: ``transformer.h.3.``."""
        return f"transformer.h.{i}."

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape, in the order of the Hugging Face GPT-2 state dict."""
        C, V, T = self.n_embd, self.vocab_size, self.block_size

        def affine(name, shape_w, n_out):  # a weight and, if the config has biases, its bias
            return {f"{name}.weight": shape_w, **({f"{name}.bias": (n_out,)} if self.bias else {})}

        shapes = {WTE: (V, C), WPE: (T, C)}
        for i in range(self.n_layer):
            p = self.block_prefix(i)
            shapes.update(affine(f"{p}ln_1", (C,), C))
            shapes.update(affine(f"{p}attn.c_attn", (C, 3 * C), 3 * C))
            shapes.update(affine(f"{p}attn.c_proj", (C, C), C))
            shapes.update(affine(f"{p}ln_2", (C,), C))
            shapes.update(affine(f"{p}mlp.c_fc", (C, 4 * C), 4 * C))
            shapes.update(affine(f"{p}mlp.c_proj", (4 * C, C), C))
        shapes.update(affine("transformer.ln_f", (C,), C))
        return shapes

    def linear_modules(self) -> dict[str, tuple[int, int]]:
        """Every linear layer an adapter may target, by module name, with its weight's (C_in, C_out).

        The output head is left out: it is the token embedding, transposed.
        """
        shapes = self.parameter_shapes()
        return {
            f"{self.block_prefix(i)}{m}": shapes[f"{self.block_prefix(i)}{m}.weight"]
            for i in range(self.n_layer)
            for m in GPT_LINEAR_MODULES
        }


PRESETS = {
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "small": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "medium": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2s": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # GPT-2 small's body, V = 256
}


def get_preset(name: str, **overrides) -> GPTConfig:
    """A preset's config, with any field replaced, e.g. get_preset("tiny", dropout=0.1)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig.from_dict({**PRESETS[name].to_dict(), **overrides})
