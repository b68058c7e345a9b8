"""Fuzzing the configs and the command line: a correct result or one clear error, never another exception.

Each property draws values of every kind JSON or a shell can deliver (numbers of both types,
NaN and the infinities, strings, booleans, null, lists) for the fields of GPTConfig, LoraConfig
and TrainSettings, and arbitrary text for the numeric flags. Either the object is made and holds
values of the intended type and range, or a ValueError names one of the fields that were given
(argparse: exit code 2 and one ``error:`` line naming the flag).
"""

import contextlib
import io
import math
import numbers

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.cli import build_parser
from minilora.config import GPTConfig
from minilora.lora.config import LoraConfig
from minilora.training.loop import TrainSettings

FUZZ = settings(max_examples=100, deadline=None)
FUZZ_FLAG = settings(max_examples=40, deadline=None)  # per flag
ANY_VALUE = st.one_of(
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 16.0, math.nan, math.inf]),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.sampled_from(["8", "false", "true", "c_attn", "all-linear", "(", "c_.*", "default", "none"]),
    st.lists(st.one_of(st.integers(-1, 3), st.text(max_size=3)), max_size=3),
)


def fields_of(cls, exclude=()):
    return [name for name in cls.__dataclass_fields__ if name not in exclude]


def assert_names_a_given_field(error: ValueError, given_fields):
    message = str(error)
    assert "\n" not in message
    assert any(field in message for field in given_fields), message


@FUZZ
@given(st.dictionaries(st.sampled_from(fields_of(GPTConfig)), ANY_VALUE, max_size=4))
def test_gpt_config_is_valid_or_names_the_field(values):
    try:
        config = GPTConfig.from_dict(values)
    except ValueError as error:
        assert_names_a_given_field(error, values)
        return
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        value = getattr(config, name)
        assert type(value) is int and value >= 1
    assert config.n_embd % config.n_head == 0
    assert type(config.dropout) is float and 0.0 <= config.dropout < 1.0
    assert type(config.bias) is bool


@FUZZ
@given(st.dictionaries(st.sampled_from(fields_of(LoraConfig)), ANY_VALUE, max_size=4))
def test_lora_config_is_valid_or_names_the_field(values):
    try:
        config = LoraConfig.from_dict(values)
    except ValueError as error:
        names = {*values, *("rank" if "r" in values else ())}  # r's message says "rank r"
        assert_names_a_given_field(error, names | ({"use_dora"} if "init" in values else set()))
        return
    assert type(config.r) is int and config.r >= 1
    assert type(config.lora_alpha) is float and math.isfinite(config.lora_alpha) and config.lora_alpha > 0
    assert 0.0 <= config.lora_dropout < 1.0
    assert isinstance(config.target_modules, (str, tuple)) and config.target_modules
    layers = config.layers_to_transform
    assert layers is None or all(type(i) is int and i >= 0 for i in layers)
    assert all(type(getattr(config, f)) is bool for f in ("use_rslora", "use_dora", "dora_exact_gradient"))
    assert config.scaling > 0 and math.isfinite(config.scaling)


@FUZZ
@given(st.dictionaries(st.sampled_from(fields_of(TrainSettings)), ANY_VALUE, max_size=4))
def test_train_settings_are_valid_or_name_the_field(values):
    try:
        settings_ = TrainSettings(**values)
    except ValueError as error:
        assert_names_a_given_field(error, values)
        return
    for name in fields_of(TrainSettings):
        value = getattr(settings_, name)
        assert isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    assert settings_.lr > 0 and 0 <= settings_.min_lr <= settings_.lr and settings_.grad_clip >= 0


# (command, flag, what a value that parses must be)
NUMERIC_FLAGS = [
    ("eval", "--batch-size", lambda v: type(v) is int and v >= 1),
    ("eval", "--eval-windows", lambda v: type(v) is int and v >= 1),
    ("generate", "--max-new-tokens", lambda v: type(v) is int and v >= 0),
    ("generate", "--temperature", lambda v: math.isfinite(v) and v >= 0),
    ("generate", "--top-k", lambda v: type(v) is int and v >= 1),
    ("finetune", "--lr", lambda v: math.isfinite(v) and v > 0),
    ("finetune", "--min-lr", lambda v: math.isfinite(v) and v >= 0),
    ("finetune", "--grad-clip", lambda v: math.isfinite(v) and v >= 0),
    ("finetune", "--steps", lambda v: type(v) is int and v >= 1),
    ("finetune", "--lora-dropout", lambda v: math.isfinite(v) and 0 <= v < 1),
    ("pretrain", "--n-layer", lambda v: type(v) is int and v >= 1),
]
FLAG_TEXT = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["nan", "inf", "-inf", "0", "-5", "1e-3", "1e400", "3", "2.5", " 7 ", "1_0", "0x10", ""]),
)
PARSER = build_parser()


@pytest.mark.parametrize("command, flag, valid", NUMERIC_FLAGS, ids=[f"{c} {f}" for c, f, _ in NUMERIC_FLAGS])
@FUZZ_FLAG
@given(text=FLAG_TEXT)
def test_numeric_flags_parse_to_a_valid_value_or_one_error_line(command, flag, valid, text):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = PARSER.parse_args([command, f"{flag}={text}"])
    except SystemExit as exit_info:
        assert exit_info.code == 2
        message = err.getvalue()
        assert message.count("\n") == 1 and message.startswith(
            f"minilora {command}: error: argument {flag}: "
        )
        return
    assert valid(getattr(args, flag.lstrip("-").replace("-", "_")))
