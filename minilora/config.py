"""The shape of a GPT-2-style model: its configuration and the named presets.

Shape letters used throughout minilora: B batch, T time (positions), C channels (n_embd),
V vocabulary, H heads, hs head size (C / H), r LoRA rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .validate import check_bool, check_float, check_int


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 4  # number of transformer blocks
    n_head: int = 4  # attention heads per block (H); n_embd must be divisible by it
    n_embd: int = 128  # channels of the residual stream (C)
    block_size: int = 128  # longest sequence the model accepts, the size of the position table (T max)
    vocab_size: int = 256  # V; 256 for minilora's byte-level tokenizer
    dropout: float = 0.0  # probability for GPT-2's embedding, attention and residual dropouts
    bias: bool = True  # biases in the linear and LayerNorm layers (GPT-2 has them)

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        if not isinstance(values, dict):
            raise ValueError(f"a GPTConfig must be a mapping of its fields, got {type(values).__name__}")
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(map(str, unknown))}")
        return cls(**values)


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
