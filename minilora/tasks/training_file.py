"""A task's training split as chat data: one conversation a line, the JSON Lines that ``finetune`` reads.

Each line is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "task": NAME,
"written_by": "minilora task-data"}``: ``minilora finetune --corpus FILE.jsonl`` reads the messages
(io/chat_data.py) and renders them with the chat template, as the task asks its questions. The
conversations are drawn from the task's training split only, so no held-out item is ever in one.

The file is claimed as every result of minilora's is (io/run_folder.py): an existing file is replaced
only with ``overwrite`` and only if its first line says minilora task-data wrote it; anything else
there is refused, ``overwrite`` or not. The write is atomic: a reader sees the old file or the new one.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.checkpoint import atomic_write_bytes
from ..io.run_folder import claimed_output
from .task import Task

WRITTEN_BY = "minilora task-data"


def written_by_task_data(path: Path) -> bool:
    """True if the first line of the file ``path`` is a record that minilora task-data wrote."""
    try:
        with open(path, "rb") as file:
            record = json.loads(file.readline())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("written_by") == WRITTEN_BY


def training_file_state(path, kind: str) -> tuple[list[str], str | None]:
    """(what is at ``path``, why it may not be replaced or None): the ``state`` run_folder's claim asks."""
    path = Path(path)
    if not path.exists():
        return [], None
    if not path.is_file() or not written_by_task_data(path):
        return [path.name], f"is not a training file minilora {kind} wrote"
    return [path.name], None


def conversation_lines(task_name: str, conversations: list[list[dict]]) -> bytes:
    """The conversations as JSON Lines, one record a line, UTF-8."""
    records = (
        {"messages": messages, "task": task_name, "written_by": WRITTEN_BY} for messages in conversations
    )
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def write_training_file(task: Task, path, n: int, seed: int, overwrite: bool = False) -> int:
    """Write ``n`` of ``task``'s training conversations (fewer if it has fewer) to ``path``; returns how many."""
    conversations = task.training_conversations(n, seed)
    with claimed_output(path, "task-data", overwrite, training_file_state) as target:
        atomic_write_bytes(target, conversation_lines(task.name, conversations))
    return len(conversations)
