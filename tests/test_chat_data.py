"""Instruction data as a corpus: the Devil's Dictionary as question-and-answer turns, JSON Lines
conversations, and one clear line for each malformed line of a file."""

import json

import numpy as np
import pytest

from minilora.io.chat_data import (
    ChatDataError,
    dictionary_conversations,
    encode_conversation,
    read_conversations,
    render,
    utf8_bytes,
)
from minilora.io.data import load_corpus

ENTRIES = """ABASEMENT, n.  A decent and customary mental attitude in the presence
of wealth or power.

ALLEGIANCE, n.

    This thing Allegiance, as I suppose,
    Is a ring fitted in the subject's nose.
                                                                  G.J.

BRIDE, n.  A woman with a fine prospect of happiness behind her.
"""


def test_each_dictionary_entry_is_one_exchange_with_its_whole_text():
    conversations = dictionary_conversations(ENTRIES)
    assert [c[0]["content"] for c in conversations] == [
        "What does the Devil's Dictionary say about abasement?",
        "What does the Devil's Dictionary say about allegiance?",
        "What does the Devil's Dictionary say about bride?",
    ]
    assert conversations[1][1] == {
        "role": "assistant",
        "content": ENTRIES.split("\n\n", 1)[1].split("\n\nBRIDE")[0],
    }
    assert (
        conversations[2][1]["content"] == "BRIDE, n.  A woman with a fine prospect of happiness behind her."
    )


def test_the_shipped_chat_corpus_keeps_the_dictionarys_split():
    chat, plain = load_corpus("devils_dictionary_chat"), load_corpus("devils_dictionary")
    val_text = chat.val.tobytes().decode()
    assert val_text.startswith("<|im_start|>system\n") and "<|im_start|>assistant\nABRUPT, adj." in val_text
    assert (
        val_text.count("<|im_start|>user") == len(dictionary_conversations(plain.val.tobytes().decode())) > 50
    )
    assert "ABRUPT, adj." not in chat.train.tobytes().decode()  # a validation entry never trains


def write_lines(path, lines):
    path.write_text(
        "\n".join(json.dumps(line) if not isinstance(line, str) else line for line in lines) + "\n"
    )
    return path


def test_a_jsonl_file_of_conversations_is_a_corpus(tmp_path):
    turn = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path = write_lines(tmp_path / "talk.jsonl", [turn] * 9 + [{"prompt": "Last", "completion": "Bye"}])
    corpus = load_corpus(str(path))
    assert corpus.name == "talk" and corpus.val.tobytes().decode().count("<|im_start|>user\nLast") == 1
    assert corpus.train.tobytes().decode().count("<|im_start|>assistant\nHello<|im_end|>") == 9


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "talk.jsonl:2: not valid JSON"),
        ({"text": "no messages"}, 'talk.jsonl:2: expected {"messages": [...]} or {"prompt"'),
        (
            {"messages": [{"role": "user"}]},
            "talk.jsonl:2: message 0 must be a dict with str 'role' and 'content'",
        ),
    ],
)
def test_a_malformed_line_is_named_with_its_number(tmp_path, line, message):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}]}
    path = write_lines(tmp_path / "talk.jsonl", [good, line, good])
    with pytest.raises(ChatDataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_conversations(path)


def test_one_conversation_is_too_few_and_a_missing_file_is_named(tmp_path):
    path = write_lines(tmp_path / "one.jsonl", [{"prompt": "Hi", "completion": "Ho"}])
    with pytest.raises(ChatDataError, match="at least two conversations"):
        read_conversations(path)
    with pytest.raises(ValueError, match="no such file of conversations: 'nowhere.jsonl'"):
        load_corpus("nowhere.jsonl")


def test_a_prompt_completion_line_and_a_system_prompt_are_conversations(tmp_path):
    lines = [
        {"prompt": "2+2?", "completion": "4"},
        {
            "system": "Be terse.",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        },
    ]
    first, second = read_conversations(write_lines(tmp_path / "talk.jsonl", lines))
    assert first == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert second[0] == {"role": "system", "content": "Be terse."} and len(second) == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            {"messages": [{"role": "user", "content": "Hi"}]},
            "talk.jsonl:1: the conversation has no assistant turn",
        ),
        ({"prompt": "Hi"}, "talk.jsonl:1: message 1 must be a dict with str 'role' and 'content'"),
        (
            {
                "system": "x",
                "messages": [{"role": "system", "content": "y"}, {"role": "assistant", "content": "z"}],
            },
            'talk.jsonl:1: "system" must be a string, and the messages must not start with a system message too',
        ),
    ],
)
def test_a_conversation_with_nothing_to_train_on_is_refused_with_its_line(tmp_path, line, message):
    good = {"prompt": "a", "completion": "b"}
    with pytest.raises(ChatDataError, match=message.replace("(", r"\(")):
        read_conversations(write_lines(tmp_path / "talk.jsonl", [line, good, good]))


def trained_text(example):
    """The bytes of a byte-level example that are trained, as text."""
    return bytes(example.ids[example.trained].astype(np.uint8)).decode()


def test_only_the_assistants_turns_and_their_ends_are_trained():
    messages = [
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "Uno"},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "Dos"},
    ]
    masked = encode_conversation(messages, utf8_bytes)
    assert bytes(masked.ids.astype(np.uint8)).decode() == render([messages])
    assert trained_text(masked) == "Uno<|im_end|>Dos<|im_end|>"  # every assistant turn, with its end
    everything = encode_conversation(messages, utf8_bytes, train_on_prompt=True)
    assert everything.trained.all() and (everything.ids == masked.ids).all()


def test_a_chat_corpus_scores_the_assistant_and_refuses_nothing_it_should_not():
    corpus = load_corpus("devils_dictionary_chat")
    first = corpus.val_examples.examples[0]
    assert trained_text(first).startswith("ABRUPT, adj.") and trained_text(first).endswith("<|im_end|>")
    assert "What does the Devil's Dictionary" not in trained_text(first)
    assert "conversations of up to 64 tokens, on the assistant's tokens" in corpus.evaluation_line(64, 5)
    with pytest.raises(ValueError, match="--train-on-prompt and --packing apply to conversations"):
        load_corpus("devils_dictionary").configured(packing=True)
