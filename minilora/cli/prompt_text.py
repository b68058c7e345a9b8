"""Text in and out of the generating commands: a prompt from the command line, a file or stdin, and
generated text made safe to print.

``--prompt TEXT`` is the text itself (a typed backslash-n means a newline), ``--prompt @PATH`` the
contents of a UTF-8 file, and ``--prompt -`` all of standard input; file and stdin text is taken as
it is. A model can emit any byte, and a terminal acts on control bytes (a carriage return rewrites the
line, an escape sequence changes colours), so ``printable`` shows every control character except the
newline and the tab as an escape such as ``\\x00``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# C0 controls (U+0000..U+001F) but the tab and the newline, DEL, and the C1 controls (U+0080..U+009F)
CONTROL_ESCAPES = {
    code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if chr(code) not in "\t\n"
}


def read_prompt(value: str) -> str:
    """The prompt a --prompt value names: ``-`` reads stdin, ``@PATH`` a UTF-8 file, anything else is the text.

    Raises ValueError, in one line naming the file, if it is missing, unreadable or not UTF-8.
    """
    if value == "-":
        return _utf8(sys.stdin.buffer.read(), "standard input")
    if not value.startswith("@"):
        return value.replace("\\n", "\n")  # a typed backslash-n means a newline
    path = Path(value[1:])
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"--prompt {value}: no such file {str(path)!r}") from None
    except OSError as err:
        raise ValueError(f"--prompt {value}: cannot read {str(path)!r} ({err.strerror})") from None
    return _utf8(payload, f"--prompt file {str(path)!r}")


def stdin_lines():
    """Standard input's lines as they come, without their line ends; ValueError naming a line that is not UTF-8."""
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        yield _utf8(raw, f"standard input line {number}").rstrip("\r\n")


def _utf8(payload: bytes, source: str) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{source} is not UTF-8 text: byte 0x{payload[err.start]:02x} at offset {err.start}"
        ) from None


def printable(text: str) -> str:
    """``text`` with every control character but newline and tab written as an escape (``\\x00``)."""
    return text.translate(CONTROL_ESCAPES)
