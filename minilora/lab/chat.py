"""Chatting with SmolLM2-135M-Instruct through minilora's own Llama: the chat template, greedy or
sampled decoding with the key/value cache, and the end-of-turn token.

``ChatSession`` keeps the conversation (a list of {"role", "content"} messages) and answers one user
message at a time: the whole conversation is rendered with the model's chat template, encoded with
its BPE tokenizer, and extended until the model ends its turn (``<|im_end|>``) or the token budget
runs out. The prompt is re-read at every turn (no cache is kept between turns), which is simple and,
for a 135M model on short conversations, fast enough.
"""

from __future__ import annotations

import numpy as np

from ..generate import generate_ids
from ..io.bpe import BPETokenizer
from ..io.smollm2 import chat_prompt

END_OF_TURN = "<|im_end|>"


class ChatSession:
    """A conversation with a chat model; ``ask(text)`` returns the model's answer and remembers both."""

    def __init__(self, model, tokenizer: BPETokenizer, max_new_tokens: int = 200, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_k, self.seed = (
            max_new_tokens,
            temperature,
            top_k,
            seed,
        )
        self.messages: list[dict] = []
        (self.end_of_turn,) = tokenizer.encode(END_OF_TURN)  # one special token

    def ask(self, text: str) -> str:
        if not text.strip():
            raise ValueError("the message is empty: type something for the model to answer")
        self.messages.append({"role": "user", "content": text})
        prompt = np.array([self.tokenizer.encode(chat_prompt(self.messages, add_generation_prompt=True))])
        if prompt.shape[1] + self.max_new_tokens > self.model.config.block_size:
            self.messages.pop()
            raise ValueError(
                f"the conversation is {prompt.shape[1]} tokens; with {self.max_new_tokens} new ones it exceeds "
                f"the {self.model.config.block_size} positions of the cache: start a new chat"
            )
        ids = generate_ids(self.model, prompt, self.max_new_tokens, self.temperature, self.top_k,
                           self.seed + len(self.messages), stop_id=self.end_of_turn)  # fmt: skip
        answer = self.tokenizer.decode(ids[0, prompt.shape[1] :]).removesuffix(END_OF_TURN).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer
