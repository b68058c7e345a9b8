"""The family contract: each config states its model's facts, and a new family needs no edit elsewhere.

A family (GPT, Llama) is its config (``parameter_shapes``, ``linear_modules``, ``block_prefix``,
``n_kv_head``, ``dropout``, ``from_dict``) and its model class (``no_decay``, ``embedding_name``,
``peft_fan_in_fan_out``). LoRA, the accounting, the traffic count, the optimiser and the training
step ask those. The toy family below is defined here, in the test, and nowhere in minilora: that it
adapts, trains, accumulates, merges and counts proves the consumers ask the contract instead of
testing which family they were handed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import pytest

from minilora.config import GPTConfig, get_preset
from minilora.fast import accelerate, use_fast_layers
from minilora.fast.cpu.ops import CPU_OPS
from minilora.fast.distributed.traffic import full_trainable_count, traffic_table
from minilora.gradcheck import check_model
from minilora.language_model import LanguageModel
from minilora.llama import Llama, LlamaConfig, init_llama_params
from minilora.lora.accounting import lora_trainable_count
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params
from minilora.optim import AdamW
from minilora.training.step import TrainingStep, train_step
from minilora.validate import ConfigFields, check_int

# The toy family: a token table, then n_layer residual linear blocks, and the tied head.
#     x = embed[idx];  x = x + mix_i(x) for each block;  logits = x embed^T


@dataclass(frozen=True)
class ToyConfig(ConfigFields):
    n_layer: int = 2
    n_embd: int = 6
    vocab_size: int = 11
    block_size: int = 8

    family: ClassVar[str] = "toy"
    dropout: ClassVar[float] = 0.0
    n_head: ClassVar[int] = 1

    def __post_init__(self):
        for field in ("n_layer", "n_embd", "vocab_size", "block_size"):
            check_int(f"ToyConfig.{field}", getattr(self, field), minimum=1)

    @property
    def n_kv_head(self) -> int:
        return 1

    @property
    def head_size(self) -> int:
        return self.n_embd

    def block_prefix(self, i: int) -> str:
        return f"blocks.{i}."

    def parameter_shapes(self) -> dict:
        C = self.n_embd
        shapes = {"embed": (self.vocab_size, C)}
        for i in range(self.n_layer):
            shapes.update({f"blocks.{i}.mix.weight": (C, C), f"blocks.{i}.mix.bias": (C,)})
        return shapes

    def linear_modules(self) -> dict:
        return {f"blocks.{i}.mix": (self.n_embd, self.n_embd) for i in range(self.n_layer)}


class ToyCache(NamedTuple):
    ops: object
    embedding: object
    blocks: list
    head: object
    loss: object


class Toy(LanguageModel):
    embedding_name = "embed"
    no_decay = ("embed",)
    peft_fan_in_fan_out = True

    def forward(self, idx, targets=None, dropout_rng=None, kv_cache=None, positions=None):
        if positions is not None:  # a family without attention has nothing to keep packed examples apart
            raise ValueError("the toy family does not pack examples in a row")
        ops = self.ops
        idx = self.check_token_ids(idx)
        x, embedding = ops.embedding_forward(idx, self.params["embed"])  # (B, T, C)
        blocks = []
        for i in range(self.config.n_layer):
            m, block = self.linear_forward(f"blocks.{i}.mix", x, dropout_rng)
            x = ops.residual_add(x, m)
            blocks.append(block)
        logits, head = ops.linear_forward(x, self.params["embed"].T)  # (B, T, V)
        loss, loss_cache = self.loss_forward(logits, targets, idx)
        return logits, loss, ToyCache(ops, embedding, blocks, head, loss_cache)

    def backward(self, cache, dloss: float = 1.0) -> dict:
        self.check_cache(cache)
        ops, grads = self.ops, {}
        dlogits = ops.cross_entropy_backward(dloss, cache.loss)
        train_embed = self.is_trainable("embed")
        dx, dW_head, _ = ops.linear_backward(dlogits, cache.head, compute_dW=train_embed, compute_db=False)
        for i in reversed(range(self.config.n_layer)):
            dx = dx + self.linear_backward(f"blocks.{i}.mix", dx, cache.blocks[i], grads)  # residual: both
        if train_embed:
            grads["embed"] = ops.embedding_backward(dx, cache.embedding) + dW_head.T
        return {name: grads[name] for name in self.params if name in grads}


def toy_params(config: ToyConfig, seed: int = 0, dtype=np.float64) -> dict:
    rng = np.random.default_rng(seed)
    return {
        name: 0.3 * rng.standard_normal(shape).astype(dtype)
        for name, shape in config.parameter_shapes().items()
    }


TOY = ToyConfig()
LLAMA = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=16, ffn_hidden=24, vocab_size=32, block_size=16)


def batch(config, rows=4, T=5, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (rows, T)), rng.integers(0, config.vocab_size, (rows, T))


@pytest.mark.parametrize(
    "config, params",
    [
        (get_preset("tiny"), init_params(get_preset("tiny"))),
        (get_preset("tiny", bias=False), init_params(get_preset("tiny", bias=False))),
        (LLAMA, init_llama_params(LLAMA)),
        (LlamaConfig(**{**LLAMA.to_dict(), "tie_embeddings": False}), None),
        (TOY, toy_params(TOY)),
    ],
)
def test_each_config_states_its_models_facts(config, params):
    shapes = config.parameter_shapes()
    if params is not None:
        assert {name: value.shape for name, value in params.items()} == shapes
    linears = config.linear_modules()
    for name, shape in linears.items():
        assert shapes[f"{name}.weight"] == shape, name  # an adaptable module is a weight of that shape
        assert any(name.startswith(config.block_prefix(i)) for i in range(config.n_layer)), name
    prefixes = {config.block_prefix(i) for i in range(config.n_layer)}
    assert len(prefixes) == config.n_layer
    assert config.n_head % config.n_kv_head == 0
    assert 0.0 <= config.dropout < 1.0
    assert type(config).from_dict(config.to_dict()) == config
    assert "family" not in config.to_dict()  # a class fact, not a field written into files


@pytest.mark.parametrize("config_class", [GPTConfig, LlamaConfig])
def test_configs_validate_every_field_through_one_clear_line(config_class):
    with pytest.raises(ValueError, match=r"n_layer must be an integer, got True"):
        config_class(n_layer=True)
    with pytest.raises(ValueError, match=r"n_embd must be a positive integer, got 0"):
        config_class(n_embd=0)
    with pytest.raises(ValueError, match=rf"unknown {config_class.__name__} fields \['n_layers'\]"):
        config_class.from_dict({"n_layers": 2})
    with pytest.raises(ValueError, match=rf"a {config_class.__name__} must be a mapping"):
        config_class.from_dict([("n_layer", 2)])


def test_llama_config_refuses_a_string_bool_a_nan_and_an_unknown_pairing():
    with pytest.raises(ValueError, match="tie_embeddings must be true or false, got 'false'"):
        LlamaConfig(tie_embeddings="false")
    with pytest.raises(ValueError, match="rope_theta must be a finite number"):
        LlamaConfig(rope_theta=float("nan"))
    with pytest.raises(ValueError, match="rope_pairing must be one of"):
        LlamaConfig(rope_pairing="interleaved")


@pytest.mark.parametrize(
    "lora_config",
    [
        LoraConfig(r=2, target_modules="all-linear"),
        LoraConfig(r=3, target_modules=["mix"], bias="all", use_dora=True),
    ],
)
def test_accounting_and_traffic_count_a_family_they_have_never_seen(lora_config):
    model = add_lora(Toy(TOY, toy_params(TOY)), lora_config)
    assert lora_trainable_count(lora_config, TOY) == model.num_parameters(trainable_only=True)
    assert full_trainable_count(TOY) == Toy(TOY, toy_params(TOY)).num_parameters()
    table = traffic_table(TOY, lora_config)
    assert table["lora_trainable"] == model.num_parameters(trainable_only=True)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_lora_counts_equal_the_built_models_for_gpt_and_llama(family):
    config, model = (
        (get_preset("tiny"), GPT(get_preset("tiny"), init_params(get_preset("tiny"))))
        if family == "gpt"
        else (LLAMA, Llama(LLAMA, init_llama_params(LLAMA)))
    )
    lora_config = LoraConfig(r=4, target_modules="all-linear", use_dora=True, bias="all")
    assert lora_trainable_count(lora_config, config) == add_lora(model, lora_config).num_parameters(True)
    assert full_trainable_count(config) == model.num_parameters()


def test_a_toy_familys_lora_gradients_match_finite_differences():
    base = Toy(TOY, toy_params(TOY))
    model = add_lora(base, LoraConfig(r=2, target_modules=["mix"], init="random", bias="all"))
    assert type(model).__name__ == "LoraToy" and model.base_model_class is Toy
    x, y = batch(TOY)
    result = check_model(model, x, y, mode="elementwise")
    assert set(result.errors()) == set(model.trainable_names)
    result.assert_ok(1e-7)


def test_a_toy_family_trains_merges_and_takes_the_fast_path():
    model = add_lora(Toy(TOY, toy_params(TOY)), LoraConfig(r=2, target_modules=["mix"], init="random"))
    optimizer = AdamW(model.params, model.trainable_names, lr=1e-2, no_decay=model.no_decay)
    step = accelerate(model, optimizer, grad_clip=1.0, shards=2, grad_accum=2)
    assert isinstance(step, TrainingStep) and model.ops is CPU_OPS
    x, y = batch(TOY, rows=4)
    losses = [float(step(model, optimizer, x, y, None, 1.0)) for _ in range(5)]
    assert losses[-1] < losses[0]
    merged = model.merge_and_unload()
    assert type(merged) is Toy
    np.testing.assert_allclose(merged.forward(x)[0], model.forward(x)[0], rtol=1e-12, atol=1e-12)


def test_the_optimiser_leaves_the_families_tables_undecayed():
    for model in (Toy(TOY, toy_params(TOY)), GPT(get_preset("tiny"), init_params(get_preset("tiny")))):
        optimizer = AdamW(model.params, model.trainable_names, no_decay=model.no_decay)
        assert not set(model.no_decay) & optimizer.decay_names
        matrices = {name for name in model.params if model.params[name].ndim == 2}
        assert optimizer.decay_names == matrices - set(model.no_decay)


def test_generation_keeps_the_key_value_heads_the_config_states():
    from minilora.generate import KVCache

    for model in (
        Llama(LLAMA, init_llama_params(LLAMA)),
        GPT(get_preset("tiny"), init_params(get_preset("tiny"))),
    ):
        cache = KVCache(model, batch_size=2)
        assert cache.keys[0].shape == (
            2,
            model.config.n_kv_head,
            model.config.block_size,
            model.config.head_size,
        )


def test_the_reference_step_is_its_two_halves_on_a_toy_family():
    models = [Toy(TOY, toy_params(TOY)) for _ in range(2)]
    for model in models:
        use_fast_layers(model)
    optimizers = [AdamW(m.params, m.trainable_names, lr=1e-2, no_decay=m.no_decay) for m in models]
    x, y = batch(TOY)
    loss_a = train_step(models[0], optimizers[0], x, y, None, 0.5)
    loss_b = TrainingStep()(models[1], optimizers[1], x, y, None, 0.5)
    assert math.isclose(float(loss_a), float(loss_b), rel_tol=0, abs_tol=0)
    for name in models[0].params:
        assert np.array_equal(models[0].params[name], models[1].params[name]), name
