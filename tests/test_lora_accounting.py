"""Counting LoRA parameters: r (C_in + C_out) per adapted matrix, PEFT's summary line, the per-module table.

Every expected count is worked out here from the weight shapes of GPT-2's layout, never with the
library's own formula.
"""

import math

import numpy as np
import pytest

from minilora.config import GPTConfig, get_preset
from minilora.lora.accounting import (
    format_table,
    lora_parameter_table,
    lora_trainable_count,
    model_summary_line,
    summary_line,
)
from minilora.lora.config import LoraConfig
from minilora.lora.model import add_lora
from minilora.model import GPT, init_params

GPT2_SMALL = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
GPT2_SMALL_PARAMS = 124_439_808  # Hugging Face's GPT2LMHeadModel("gpt2"), head tied to wte
C = 768
# GPT-2's four linear weights per block, (C_in, C_out): c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj.
GPT2_LINEAR_SHAPES = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]
# Every bias of one block: ln_1, c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj; and ln_f's.
GPT2_BLOCK_BIASES = C + 3 * C + C + C + 4 * C + C


def test_gpt2_small_c_attn_at_rank_8_trains_294912_parameters():
    lora_config = LoraConfig(r=8, target_modules=("c_attn",))
    rows = lora_parameter_table(lora_config, GPT2_SMALL)
    assert len(rows) == 12
    assert [row["module"] for row in rows] == [f"transformer.h.{i}.attn.c_attn" for i in range(12)]
    assert all(row["weight_shape"] == (768, 2304) and row["r"] == 8 for row in rows)
    assert all(row["adapter_params"] == 8 * (768 + 2304) == 24_576 for row in rows)
    assert lora_trainable_count(lora_config, GPT2_SMALL) == 294_912


def test_gpt2_small_summary_matches_peft_print_trainable_parameters():
    base_total = sum(math.prod(shape) for shape in GPT2_SMALL.parameter_shapes().values())
    assert base_total == GPT2_SMALL_PARAMS
    trainable = lora_trainable_count(LoraConfig(r=8, target_modules=("c_attn",)), GPT2_SMALL)
    # What PEFT prints for GPT-2 with LoraConfig(r=8, target_modules=["c_attn"]).
    assert summary_line(trainable, base_total + trainable) == (
        "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
    )


@pytest.mark.parametrize("r", [1, 2, 8, 16, 64])
def test_all_linear_counts_every_linear_weight_of_every_block(r):
    lora_config = LoraConfig(r=r, target_modules="all-linear")
    expected = 12 * sum(r * (C_in + C_out) for C_in, C_out in GPT2_LINEAR_SHAPES)
    rows = lora_parameter_table(lora_config, GPT2_SMALL)
    assert len(rows) == 48
    assert sorted({row["weight_shape"] for row in rows}) == sorted(GPT2_LINEAR_SHAPES)
    assert sum(row["adapter_params"] for row in rows) == expected
    assert lora_trainable_count(lora_config, GPT2_SMALL) == expected
    if r == 8:
        assert expected == 1_179_648


def test_layers_to_transform_counts_only_the_chosen_blocks():
    lora_config = LoraConfig(r=4, target_modules=("c_attn", "mlp.c_fc"), layers_to_transform=(0, 11))
    rows = lora_parameter_table(lora_config, GPT2_SMALL)
    assert {row["module"] for row in rows} == {
        f"transformer.h.{i}.{m}" for i in (0, 11) for m in ("attn.c_attn", "mlp.c_fc")
    }
    assert lora_trainable_count(lora_config, GPT2_SMALL) == 2 * (4 * (768 + 2304) + 4 * (768 + 3072))


@pytest.mark.parametrize(
    "bias, layers, expected_biases",
    [
        ("none", None, 0),
        ("lora_only", None, 12 * 3 * C),  # the c_attn bias of each of the 12 blocks
        ("lora_only", (3, 7), 2 * 3 * C),  # only the adapted blocks' c_attn biases
        ("all", None, 12 * GPT2_BLOCK_BIASES + C),  # every bias, ln_f's included, whatever is adapted
        ("all", (3, 7), 12 * GPT2_BLOCK_BIASES + C),
    ],
)
def test_trained_biases_are_added_to_the_count(bias, layers, expected_biases):
    lora_config = LoraConfig(r=8, target_modules=("c_attn",), layers_to_transform=layers, bias=bias)
    blocks = 12 if layers is None else len(layers)
    assert lora_trainable_count(lora_config, GPT2_SMALL) == blocks * 8 * (768 + 2304) + expected_biases


def test_summary_line_of_a_built_model_counts_its_arrays_in_peft_format():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16)
    model = add_lora(GPT(config, init_params(config)), LoraConfig(r=4, target_modules=("c_attn",)))
    adapter = sum(value.size for name, value in model.params.items() if name.endswith((".lora_A", ".lora_B")))
    everything = sum(value.size for value in model.params.values())
    assert adapter == 2 * 4 * (16 + 48) == 512
    # wte 256x16 + wpe 16x16 + 2 blocks of (2 LayerNorms 2x16 each, c_attn 16x48+48, c_proj 16x16+16,
    # c_fc 16x64+64, mlp c_proj 64x16+16) + ln_f 2x16, plus the adapter.
    assert everything == 4096 + 256 + 2 * (64 + 816 + 272 + 1088 + 1040) + 32 + 512 == 11_456
    assert model_summary_line(model) == "trainable params: 512 || all params: 11,456 || trainable%: 4.4693"
    assert f"{100 * 512 / 11456:.4f}" == "4.4693"


def test_summary_line_uses_thousands_separators_and_four_decimals():
    assert summary_line(1_234_567, 98_765_432) == (
        "trainable params: 1,234,567 || all params: 98,765,432 || trainable%: 1.2500"
    )
    assert summary_line(1, 3) == "trainable params: 1 || all params: 3 || trainable%: 33.3333"


def test_format_table_has_a_row_per_module_and_the_total():
    rows = lora_parameter_table(LoraConfig(r=8, target_modules=("c_attn",)), GPT2_SMALL)
    lines = format_table(rows).splitlines()
    assert len(lines) == 2 + 12 + 1  # header, rule, one line per module, total
    assert lines[0].split() == ["module", "weight", "shape", "r", "adapter", "params"]
    assert set(lines[1]) == {"-"}
    for i, line in enumerate(lines[2:-1]):
        assert line.split() == [f"transformer.h.{i}.attn.c_attn", "768", "x", "2304", "8", "24,576"]
    assert lines[-1].split() == ["total", "294,912"]


def test_format_table_total_sums_rows_of_mixed_modules():
    rows = lora_parameter_table(
        LoraConfig(r=2, target_modules="all-linear"), GPTConfig(n_layer=1, n_head=2, n_embd=16)
    )
    table = format_table(rows)
    expected = 2 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))  # = 512
    assert table.splitlines()[-1].split() == ["total", f"{expected:,}"]
    assert "transformer.h.0.mlp.c_proj" in table and "64 x 16" in table


@pytest.mark.parametrize("r", [1, 4, 8, 16, 64])
def test_medium_preset_attention_adapter_counts(r):
    config = get_preset("medium")
    assert (config.n_layer, config.n_embd) == (6, 384)
    lora_config = LoraConfig(r=r, target_modules=("c_attn", "attn.c_proj"))
    rows = lora_parameter_table(lora_config, config)
    print(f"\nmedium preset, c_attn + attn.c_proj, r={r}\n{format_table(rows)}")
    expected = 6 * r * ((384 + 1152) + (384 + 384))
    assert sum(row["adapter_params"] for row in rows) == expected
    assert lora_trainable_count(lora_config, config) == expected
    assert format_table(rows).splitlines()[-1].split() == ["total", f"{expected:,}"]


def test_counts_from_configs_agree_with_a_built_model_including_biases():
    config = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8)
    base = GPT(config, init_params(config, dtype=np.float32))
    for bias in ("none", "lora_only", "all"):
        lora_config = LoraConfig(
            r=3, target_modules=("attn.c_proj", "mlp.c_fc"), layers_to_transform=(0, 2), bias=bias
        )
        model = add_lora(base, lora_config)
        trained = sum(model.params[name].size for name in model.trainable_names)
        lora_numbers = 2 * 3 * ((16 + 16) + (16 + 64))
        # lora_only: the c_fc bias (64) of blocks 0 and 2 (attn.c_proj's 16 too);
        # all: ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj of every block, and ln_f.
        bias_numbers = {"none": 0, "lora_only": 2 * (16 + 64), "all": 3 * (16 + 48 + 16 + 16 + 64 + 16) + 16}[
            bias
        ]
        assert trained == lora_numbers + bias_numbers, bias
        assert lora_trainable_count(lora_config, config) == trained, bias
