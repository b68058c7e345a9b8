"""Generated answers checked exactly: a chat model's greedy reply, cut to its first line, against the answer.

The question is rendered with the chat template (``smollm2.chat_prompt``, generation prompt
included), whichever the family: it is the text ``minilora finetune --corpus FILE.jsonl`` trains on,
for a byte-level GPT as for SmolLM2, so a fine-tune on a task's training file sees its questions
exactly as they are asked here. The model then decodes greedily (temperature 0: the score is a
property of the model, not of a sampling seed), and only the new tokens are read: the reply ends at
the template's end of turn or at the first newline, whichever comes first. Generation stops at the
tokenizer's end-of-sequence token where it has one (SmolLM2's ``<|im_end|>``), else at a newline
(the byte-level tokenizer has none), or after the answer's length plus ``SPARE_TOKENS`` tokens.

Replies and answers are compared after ``normalise``: case, surrounding white space, quotes and a
final full stop do not count, every other character does.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..generate import generate_ids
from ..io.smollm2 import chat_prompt
from .task import AnswerItem, TaskScore

END_OF_TURN = "<|im_end|>"
SPARE_TOKENS = 12  # room past the answer's length for the end of turn and a wrong, longer reply
NOT_PART_OF_AN_ANSWER = " \t\n\"'`.!"


def chat_reply(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """The model's greedy reply to ``question`` as one user message, up to its end of turn or first newline."""
    text = chat_prompt([{"role": "user", "content": question}], add_generation_prompt=True)
    prompt = np.asarray(tokenizer.encode(text), dtype=np.int64)[None, :]  # (1, T0)
    stop_id = tokenizer.eos_id if tokenizer.eos_id is not None else int(tokenizer.encode("\n")[0])
    ids = generate_ids(model, prompt, max_new_tokens, temperature=0.0, stop_id=stop_id)  # (1, T0 + n)
    reply = tokenizer.decode(ids[0, prompt.shape[1] :])
    return reply.split(END_OF_TURN)[0].split("\n")[0]


def normalise(text: str) -> str:
    """``text`` as answers are compared: lower case, without surrounding white space, quotes or full stop."""
    return text.strip(NOT_PART_OF_AN_ANSWER).lower()


def is_right(reply: str, answer: str) -> bool:
    """True if ``reply`` is ``answer`` once both are normalised."""
    return normalise(reply) == normalise(answer)


def exact_match(
    model, tokenizer, items: list[AnswerItem], progress: bool = False, name: str = ""
) -> TaskScore:
    """The fraction of ``items`` whose greedy reply is the answer (a tqdm bar named ``name`` with ``progress``)."""
    right = 0
    for item in tqdm(items, desc=name, unit="item", disable=not progress, leave=False):
        budget = len(tokenizer.encode(item.answer)) + SPARE_TOKENS
        right += is_right(chat_reply(model, tokenizer, item.question, budget), item.answer)
    return TaskScore(right / len(items))
