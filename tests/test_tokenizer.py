"""Tests of the byte-level tokenizer: round trips, the byte mapping, and clear errors."""

import numpy as np
import pytest

from minilora.io.tokenizer import VOCAB_SIZE, decode, encode


@pytest.mark.parametrize(
    "text",
    [
        "Stand & vnfold your selfe",  # ASCII
        "naïve café, Schrödinger, Œdipus",  # accented (two-byte UTF-8)
        "good night 🌙 sweet prince 👑",  # emoji (four-byte UTF-8)
        "line one\r\nline two\r\n",  # CRLF is kept as two bytes
        "",
    ],
)
def test_decode_inverts_encode(text):
    assert decode(encode(text)) == text


def test_encode_gives_the_utf8_bytes_as_uint8():
    ids = encode("aé🌙\r\n")
    assert ids.dtype == np.uint8
    assert ids.tolist() == list("aé🌙\r\n".encode())
    assert len(ids) == 1 + 2 + 4 + 2


def test_vocab_covers_every_byte_value():
    assert VOCAB_SIZE == 256
    every_byte = np.arange(VOCAB_SIZE)
    assert decode(every_byte[:128]) == "".join(chr(i) for i in range(128))
    assert isinstance(decode(every_byte), str)  # the rest are not valid UTF-8 alone, but decode


def test_decode_accepts_lists_and_any_integer_dtype():
    assert decode([72, 105]) == "Hi"
    for dtype in (np.int8, np.int32, np.int64, np.uint16, np.uint64):
        assert decode(np.array([72, 105], dtype=dtype)) == "Hi"


def test_decode_replaces_invalid_utf8_instead_of_failing():
    half_of_e_acute = encode("é")[:1]
    assert decode(half_of_e_acute) == "\ufffd"
    assert decode([104, 0xFF, 105]) == "h\ufffdi"


@pytest.mark.parametrize("bad_id, position", [(256, 2), (-1, 1), (1000, 0)])
def test_decode_names_the_out_of_range_id_and_its_position(bad_id, position):
    ids = [65, 66, 67]
    ids[position] = bad_id
    with pytest.raises(ValueError, match=rf"token id {bad_id} at position {position} .*0\.\.255"):
        decode(ids)


def test_decode_rejects_non_integer_ids():
    with pytest.raises(ValueError, match="must be integers.*float"):
        decode(np.array([65.0, 66.0]))


def test_decode_rejects_a_batch_instead_of_a_sequence():
    with pytest.raises(ValueError, match=r"1-D.*\(2, 2\)"):
        decode(np.zeros((2, 2), dtype=np.int64))


def test_encode_rejects_bytes():
    with pytest.raises(TypeError, match="expects a str, got bytes"):
        encode(b"already bytes")
