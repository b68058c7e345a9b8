"""The Witten-Bell byte n-gram baseline: a proper distribution, equal to a plain-Python reference."""

from collections import Counter

import numpy as np
import pytest

from minilora.lab.baseline import ByteNgramCounts, ngram_bits_per_byte

TRAIN = np.frombuffer(b"the cat sat on the mat; the hat is flat. that cat ate the rat.", dtype=np.uint8)


def reference_probability(train: bytes, context: bytes, x: int, order: int) -> float:
    """Interpolated Witten-Bell written the slow, obvious way with dictionaries."""
    prob = 1 / 256
    for k in range(order):
        h = context[len(context) - k :] if k else b""
        follows = Counter(train[i + k] for i in range(len(train) - k) if train[i : i + k] == h)
        c_h, u_h = sum(follows.values()), len(follows)
        if c_h:
            prob = (follows[x] + u_h * prob) / (c_h + u_h)
    return prob


def test_probabilities_equal_the_plain_python_reference():
    val = np.frombuffer(b"the fat cat sat; a bat!", dtype=np.uint8)
    probs = ByteNgramCounts(TRAIN, order=4).probabilities(val)
    raw = TRAIN.tobytes()
    expected = [
        reference_probability(raw, val[i - 3 : i].tobytes(), int(val[i]), 4) for i in range(3, len(val))
    ]
    np.testing.assert_allclose(probs, expected, rtol=1e-12)


@pytest.mark.parametrize("context", [b"the", b"at ", b"zzz", b"e c"])
def test_probabilities_over_all_bytes_sum_to_one(context):
    counts = ByteNgramCounts(TRAIN, order=4)
    texts = np.array([list(context) + [x] for x in range(256)], dtype=np.uint8)  # every next byte
    total = sum(counts.probabilities(row)[0] for row in texts)
    assert total == pytest.approx(1.0, abs=1e-12)


def test_higher_order_fits_repetitive_text_better():
    text = np.frombuffer(b"abcabcabcabcabcabcabcabc" * 20, dtype=np.uint8)
    assert ngram_bits_per_byte(text, text, order=3) < ngram_bits_per_byte(text, text, order=1)


def test_unseen_text_costs_about_eight_bits_when_nothing_matches():
    train = np.frombuffer(b"aaaaaaaa", dtype=np.uint8)
    val = np.frombuffer(b"xyzw", dtype=np.uint8)
    # unigram: P(x) = (0 + 1/256) / (8 + 1), so about 8 + log2(9) bits
    assert ngram_bits_per_byte(train, val, order=4) == pytest.approx(8 + np.log2(9), rel=1e-9)
