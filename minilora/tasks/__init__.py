"""Task evaluation: did the fine-tune work? Questions with checkable answers, scored on held-out items.

Bits per byte say how well a model predicts text; they do not say whether it can now do what it was
fine-tuned for. A task does: it asks one kind of question many times, on items drawn by a seed from
a held-out split that no training file contains, and prints the score of a strategy that needs no
model (a uniform guess, echoing the question) beside the model's. ``minilora evaluate-task`` runs
them, ``minilora task-data`` writes a task's training split as chat data for ``minilora finetune``.
The reference is untouched: a task calls the model's ``forward`` and ``generate_ids``, nothing else.

Reading order:

    task.py           the Task interface, its two kinds of item, and items drawn by a seed from a split
    generation.py     a chat model's greedy reply to a question, checked exactly against the answer
    likelihood.py     multiple choice: the options' log-likelihoods after a context, ranked per byte
    reverse_word.py   reverse-word: spell a Shakespeare word backwards (exact match)
    next_line.py      next-line: the real next line of the First Folio among four (multiple choice)
    devils_chat.py    devils-chat: Bierce's definition of the word asked about, in the chat format
    suite.py          the tasks by name, and evaluate_tasks: scores and baselines, one dict per task
    training_file.py  a task's training split as JSON Lines conversations, never over another's file
"""

from .suite import ALL, TASKS, evaluate_tasks, get_task

__all__ = ["ALL", "TASKS", "evaluate_tasks", "get_task"]
