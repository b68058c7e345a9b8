"""How the command line refuses a bad value: argparse ``type=`` callables and a one-line error.

``type=int`` takes ``--batch-size 0`` and ``type=float`` takes ``--lr nan``; both then fail deep
inside a job, or not at all (a NaN gradient limit turns clipping off without a word). These
callables raise ``argparse.ArgumentTypeError``, which ``OneLineErrorParser`` turns into one line,
``minilora finetune: error: argument --lr: 'nan' is not a finite number (see ...)``, and exit
code 2, before anything runs.
"""

from __future__ import annotations

import argparse
import math


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (argparse's own adds the usage), exit code 2.

    Its subcommands' parsers are of this class too (add_subparsers makes them of the parent's class).
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_old_name(parser, action: argparse.Action, old_name: str) -> None:
    """Accept ``old_name`` for ``action``'s flag as well, hidden from --help, where the flag's help names it.

    Each name reports its own errors (``argument --max-windows: ...``), so the alias costs nothing but a line.
    """
    parser.add_argument(
        old_name, dest=action.dest, type=action.type, default=action.default, help=argparse.SUPPRESS
    )
    action.help = f"{action.help} (old name: {old_name})"


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a count of steps, windows, tokens, a batch size)."""
    return _integer(text, 1, "a positive integer (>= 1)")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (a seed, a number of warmup steps)."""
    return _integer(text, 0, "a non-negative integer (>= 0)")


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (a learning rate)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number (> 0)")
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (a minimum learning rate, a weight decay, a gradient-norm limit, a temperature)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number (>= 0)")
    return value


def probability(text: str) -> float:
    """A finite float in [0, 1) (a dropout rate)."""
    value = finite_float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1)")
    return value


def block_indices(text: str) -> tuple[int, ...]:
    """Comma-separated block indices, each an integer >= 0 (``0,2``): an empty or bad item is named."""
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item: give block indices such as 0,1")
    return tuple(_block_index(item) for item in items)


def _block_index(item: str) -> int:
    if not (item.isascii() and item.isdigit()):  # "-1", "x" and "1.5" are refused alike
        raise argparse.ArgumentTypeError(f"{item!r} is not a block index (an integer >= 0)")
    return int(item)
