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
