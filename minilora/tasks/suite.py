"""The tasks by name, and ``evaluate_tasks``: held-out items scored, each with its baseline beside it.

``evaluate_tasks`` is what the command line (``minilora evaluate-task``) and any other caller, a
training loop's callback say, run: for each task named, ``items`` held-out items drawn by ``seed``,
the model's score on them and the baseline's, as one plain dict whose numbers a plot can take.
"""

from __future__ import annotations

from .devils_chat import DevilsChat
from .next_line import NextLine
from .reverse_word import ReverseWord
from .task import Task

TASKS: dict[str, Task] = {task.name: task for task in (ReverseWord(), NextLine(), DevilsChat())}
ALL = "all"  # the name that stands for every task


def get_task(name: str) -> Task:
    """The task called ``name``; ValueError naming it and the tasks there are."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: the tasks are {', '.join(TASKS)} (or {ALL})")
    return TASKS[name]


def task_names(names) -> list[str]:
    """``names`` with ``all`` replaced by every task, each once, in the order given; ValueError if none."""
    expanded = [task for name in names for task in (TASKS if name == ALL else [name])]
    if not expanded:
        raise ValueError(f"name at least one task: {', '.join(TASKS)} or {ALL}")
    for name in expanded:
        get_task(name)
    return list(dict.fromkeys(expanded))


def evaluate_task(task: Task, model, tokenizer, items: int | None, seed: int, progress: bool = False) -> dict:
    """One task's score on ``items`` held-out items (its default number if None) drawn by ``seed``."""
    chosen = task.items("val", task.default_items if items is None else items, seed)
    result = task.score(model, tokenizer, chosen, progress)
    return {
        "task": task.name,
        "items": len(chosen),
        "seed": seed,
        "score": result.score,
        "baseline": task.baseline(chosen),
        "metric": task.metric,
        "baseline_is": task.baseline_is,
        **result.details,
    }


def evaluate_tasks(
    model, tokenizer, names, items: int | None = None, seed: int = 0, progress: bool = False
) -> list[dict]:
    """Each named task (or ``all``) scored on held-out items: one dict per task, see ``evaluate_task``.

    ``tokenizer`` is the base's (``Base.tokenizer``, io/bases.py): bytes for a GPT, BPE for SmolLM2.
    """
    return [evaluate_task(TASKS[name], model, tokenizer, items, seed, progress) for name in task_names(names)]
