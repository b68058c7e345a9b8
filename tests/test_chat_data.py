"""Instruction data as a corpus: the Devil's Dictionary as question-and-answer turns, JSON Lines
conversations, and one clear line for each malformed line of a file."""

import json

import pytest

from minilora.io.chat_data import ChatDataError, dictionary_conversations, read_conversations
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
    path = write_lines(
        tmp_path / "talk.jsonl", [turn] * 9 + [{"messages": [{"role": "user", "content": "Last"}]}]
    )
    corpus = load_corpus(str(path))
    assert corpus.name == "talk" and corpus.val.tobytes().decode().count("<|im_start|>user\nLast") == 1
    assert corpus.train.tobytes().decode().count("<|im_start|>assistant\nHello<|im_end|>") == 9


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "talk.jsonl:2: not valid JSON"),
        ({"text": "no messages"}, 'talk.jsonl:2: expected {"messages": [...]}'),
        (
            {"messages": [{"role": "user"}]},
            "talk.jsonl:2: message 0 must be a dict with str 'role' and 'content'",
        ),
    ],
)
def test_a_malformed_line_is_named_with_its_number(tmp_path, line, message):
    good = {"messages": [{"role": "user", "content": "Hi"}]}
    path = write_lines(tmp_path / "talk.jsonl", [good, line, good])
    with pytest.raises(ChatDataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_conversations(path)


def test_one_conversation_is_too_few_and_a_missing_file_is_named(tmp_path):
    path = write_lines(tmp_path / "one.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(ChatDataError, match="at least two conversations"):
        read_conversations(path)
    with pytest.raises(ValueError, match="no such file of conversations: 'nowhere.jsonl'"):
        load_corpus("nowhere.jsonl")
