"""JSON documents read from files, each failure one error naming the file.

``json.loads`` fails in ways that name nothing: a JSONDecodeError gives a line and column, bytes
that are not UTF-8 give a UnicodeDecodeError, and a document nested a few thousand levels deep
(``[[[[...]]]]``, a few kilobytes) gives a RecursionError. A config must also be a JSON object,
where a list or a number would fail later with an AttributeError. ``parse_json_object`` turns all
of these into one ValueError of the caller's class that names where the text came from.
"""

from __future__ import annotations

import json
from pathlib import Path


def parse_json_object(text: str | bytes, source: str, error=ValueError) -> dict:
    """The JSON object in ``text`` (str, or UTF-8 bytes); ``error`` names ``source`` if it is not one."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        document = json.loads(text)
    except UnicodeDecodeError as err:
        raise error(f"{source} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    except json.JSONDecodeError as err:
        raise error(f"{source} is not valid JSON ({err})") from None
    except RecursionError:
        raise error(
            f"{source} is nested too deeply to be a config (JSON arrays or objects within each other)"
        ) from None
    if not isinstance(document, dict):
        raise error(f"{source} must hold a JSON object, it holds a {type(document).__name__}")
    return document


def read_json_object(path, error=ValueError) -> dict:
    """The JSON object in the file ``path``; ``error`` names the file if it is unreadable or not one."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from err
    return parse_json_object(raw, str(path), error)
