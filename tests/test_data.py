"""Tests of corpus loading (shipped corpora, user files, the split rule, errors) and batching."""

import dataclasses
import re

import numpy as np
import pytest

from minilora.io.data import SHIPPED_CORPORA, CorpusError, load_corpus
from minilora.training.batches import get_batch


@pytest.fixture(scope="module")
def shipped():
    """Every shipped corpus, decompressed once for the module, as a dict name -> Corpus."""
    return {name: load_corpus(name) for name in SHIPPED_CORPORA}


def text_of(ids: np.ndarray) -> str:
    return ids.tobytes().decode("utf-8")


def count_words(text: str, word: str) -> int:
    return len(re.findall(rf"\b{word}\b", text, flags=re.IGNORECASE))


def test_every_shipped_corpus_loads_as_utf8_byte_arrays(shipped):
    assert set(shipped) == {"shakespeare_modern", "shakespeare_folio", "kjv", "devils_dictionary"}
    for name, corpus in shipped.items():
        assert corpus.name == name
        for split in (corpus.train, corpus.val):
            assert split.dtype == np.uint8 and split.ndim == 1
            assert len(split) > 10_000
            text_of(split)  # raises if not valid UTF-8
        assert len(corpus.val) < len(corpus.train)


def test_folio_spelling_appears_only_in_the_folio_corpus(shipped):
    folio = text_of(shipped["shakespeare_folio"].train)
    modern = text_of(shipped["shakespeare_modern"].train)
    assert "Stand & vnfold" in text_of(shipped["shakespeare_folio"].val)
    for old, new in [("vnto", "unto"), ("haue", "have"), ("loue", "love")]:
        assert count_words(folio, old) > 100
        assert count_words(modern, old) * 10 < count_words(folio, old)
        assert count_words(modern, new) > 100


def test_modern_and_folio_hold_out_the_same_three_plays(shipped):
    modern, folio = shipped["shakespeare_modern"], shipped["shakespeare_folio"]
    for corpus in (modern, folio):
        val, train = text_of(corpus.val), text_of(corpus.train)
        for name in ("Hamlet", "Macbeth", "Prospero"):  # Prospero: The Tempest
            assert count_words(val, name) > 20, (corpus.name, name)
            assert count_words(train, name) == 0, (corpus.name, name)
    # the same text in two spellings: lengths agree to within 10%
    assert abs(len(modern.val) - len(folio.val)) < 0.1 * len(modern.val)


def test_kjv_holds_out_every_tenth_chapter(shipped):
    train, val = text_of(shipped["kjv"].train), text_of(shipped["kjv"].val)
    assert train.startswith("Genesis 1\n\n1 In the beginning God created the heaven and the earth.")
    assert val.startswith("Genesis 10\n\n1 Now these are the generations of the sons of Noah")
    assert "\nGenesis 20\n" in val and "\nGenesis 11\n" in train and "Genesis 10\n" not in train
    chapters = re.compile(r"^\S.* \d+$", flags=re.MULTILINE)
    assert len(chapters.findall(val)) == 1189 // 10
    assert len(chapters.findall(train)) == 1189 - 1189 // 10


def test_devils_dictionary_holds_out_every_tenth_entry(shipped):
    corpus = shipped["devils_dictionary"]
    train, val = text_of(corpus.train), text_of(corpus.val)
    assert train.startswith("ABASEMENT, n.  A decent and customary mental attitude")
    assert val.startswith("ABRUPT, adj.")
    assert "ADAGE, n.  Boned wisdom for weak teeth." in val
    assert "Dictionary" not in train[:1000]  # the dictfmt header and preface are stripped
    assert 0.07 < len(val) / (len(train) + len(val)) < 0.13


def test_corpus_is_frozen_and_its_arrays_read_only(shipped):
    corpus = shipped["devils_dictionary"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        corpus.train = corpus.val
    with pytest.raises(ValueError, match="read-only"):
        corpus.train[0] = 0


def test_text_file_splits_at_a_line_start_leaving_about_a_tenth_for_validation(tmp_path):
    text = "".join(f"line {i:03d} of the file\n" for i in range(100))
    path = tmp_path / "lines.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.name == "lines"
    assert text_of(corpus.train) + text_of(corpus.val) == text
    assert text_of(corpus.train).endswith("\n")
    # 21 bytes a line, 2100 in all: byte 2100 * 90 // 100 = 1890 is the first of line 90
    assert text_of(corpus.val).startswith("line 090 ")
    assert len(corpus.val) >= 0.1 * len(text)


def test_text_file_keeps_its_bytes_unchanged(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes("première ligne\r\n".encode() * 20)
    corpus = load_corpus(str(path))
    assert corpus.train.tobytes() + corpus.val.tobytes() == path.read_bytes()


def test_two_line_text_is_the_shortest_that_splits(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("a\nb", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert (text_of(corpus.train), text_of(corpus.val)) == ("a\n", "b")


def test_unknown_name_lists_the_shipped_corpora():
    with pytest.raises(CorpusError, match="unknown corpus 'shakespear'.*shakespeare_modern.*kjv"):
        load_corpus("shakespear")


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(CorpusError, match="no such file: .*nowhere.txt"):
        load_corpus(str(missing))


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(CorpusError, match="is not a file"):
        load_corpus(str(tmp_path))


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(CorpusError, match="empty.txt' is empty"):
        load_corpus(str(path))


def test_invalid_utf8_gives_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\nfiancée\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not valid UTF-8: .* at byte offset 8"):
        load_corpus(str(path))


def test_one_line_text_is_too_short_to_split(tmp_path):
    path = tmp_path / "one_line.txt"
    path.write_text("a single line without a break before its end\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="too short to split"):
        load_corpus(str(path))


def test_corpus_error_is_a_value_error():
    assert issubclass(CorpusError, ValueError)


def test_get_batch_targets_are_inputs_shifted_by_one():
    data = np.arange(200, dtype=np.uint8)  # distinct values: each window shows its offset
    x, y = get_batch(data, batch_size=8, block_size=16, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == np.int64
    assert np.array_equal(y, x + 1)
    assert np.array_equal(x, x[:, :1] + np.arange(16))  # contiguous windows of data


def test_get_batch_is_deterministic_for_a_seed():
    data = np.random.default_rng(1).integers(0, 256, size=5_000).astype(np.uint8)
    first = get_batch(data, 4, 32, np.random.default_rng(42))
    again = get_batch(data, 4, 32, np.random.default_rng(42))
    other = get_batch(data, 4, 32, np.random.default_rng(43))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_get_batch_reaches_every_offset_including_the_last():
    data = np.arange(12, dtype=np.uint8)
    x, y = get_batch(data, batch_size=2_000, block_size=4, rng=np.random.default_rng(0))
    assert set(x[:, 0].tolist()) == set(range(12 - 4))
    assert y.max() == 11  # the last byte is used as a target


def test_get_batch_accepts_data_of_exactly_block_size_plus_one():
    data = np.arange(5, dtype=np.uint8)
    x, y = get_batch(data, batch_size=3, block_size=4, rng=np.random.default_rng(0))
    assert np.array_equal(x, np.tile(np.arange(4), (3, 1)))
    assert np.array_equal(y, np.tile(np.arange(1, 5), (3, 1)))


def test_get_batch_rejects_data_shorter_than_block_size_plus_one():
    with pytest.raises(ValueError, match="data has 4 tokens, fewer than block_size \\+ 1 = 5"):
        get_batch(np.arange(4, dtype=np.uint8), 2, 4, np.random.default_rng(0))
