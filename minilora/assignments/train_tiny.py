"""a6's workbench: your optimiser on plain data, and a tiny GPT trained with it and your own layers.

The a6 release copies this file into student/ beside optim.py, the file you fill in. Copy your
finished a1-a3 files there too (any of linear.py, gelu.py, cross_entropy.py, layernorm.py,
embedding.py, attention.py, as their releases wrote them): the tiny GPT then runs on your own
layers, and minilora's reference layer stands in for each file that is not there. Run
``python student/train_tiny.py`` to watch it learn; the grader calls the same functions.

The run: a one-block GPT (C = 32, two heads, V = 16, T = 8) learns sequences that count through the
vocabulary from a random start by a random stride of 1, 2 or 3 (mod V), with AdamW, gradient
clipping and the warmup-cosine schedule, all taken from the optim.py beside this file. From the
second position on, the next token follows from the last two; the first step of each sequence
cannot be known, so the loss stays above (ln 3) / T even for a perfect model.

Nothing lies beside this file in the library (minilora/assignments/), so there the run uses
minilora's own optimiser and layers: that is the reference run the grader's threshold comes from.
The grader takes the trained parameters back and measures their held-out loss itself
(``held_out_loss``, with minilora's reference model, on sequences it draws): the losses this run
reports are for you to read, and the grade never rests on them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np

from ..config import GPTConfig
from ..layers import REFERENCE_OPS
from ..model import GPT, init_params
from .sandbox import first_line

HERE = Path(__file__).resolve().parent
CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=16, dropout=0.0)
STRIDES = (1, 2, 3)
B = 16  # sequences per step
EVAL_SEQUENCES = 128  # held out, drawn from the seed's own stream
STEPS, WARMUP_STEPS = 60, 6  # a second or two on a CPU core
LR, MIN_LR, WEIGHT_DECAY, GRAD_CLIP = 1e-2, 1e-3, 0.1, 1.0
# the layer functions each a1-a3 file provides, by file
LAYER_FILES = {
    "linear": ("linear_forward", "linear_backward"),
    "gelu": ("gelu_forward", "gelu_backward"),
    "cross_entropy": ("cross_entropy_forward", "cross_entropy_backward"),
    "layernorm": ("layernorm_forward", "layernorm_backward"),
    "embedding": ("embedding_forward", "embedding_backward"),
    "attention": ("attention_forward", "attention_backward", "cached_attention_forward"),
}
_loaded = {}  # stem -> module imported from beside this file


def beside(stem: str):
    """The module ``stem``.py beside this file, imported once; None when there is no such file."""
    path = HERE / f"{stem}.py"
    if stem not in _loaded:
        if not path.is_file():
            return None
        spec = importlib.util.spec_from_file_location(f"train_tiny_{stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # a student's file may raise anything while it imports
            del sys.modules[spec.name]
            raise ImportError(
                f"{path.name} beside train_tiny.py does not import: {type(err).__name__}: "
                f"{first_line(str(err))}"
            ) from err
        _loaded[stem] = module
    return _loaded[stem]


def optim_module():
    """optim.py beside this file (your a6 work), else minilora's own."""
    module = beside("optim")
    if module is None:
        from .. import optim as module
    return module


def layer_ops():
    """A LayerOps with the a1-a3 layer pairs of the files beside this file, the reference elsewhere.

    Returns (ops, the file names whose functions it uses).
    """
    functions, used = {}, []
    for stem, names in LAYER_FILES.items():
        module = beside(stem)
        if module is not None:
            functions.update({name: getattr(module, name) for name in names})
            used.append(f"{stem}.py")
    return dataclasses.replace(REFERENCE_OPS, name="student" if used else "reference", **functions), used


def counting_batch(rng, batch_size: int = B, T: int = CONFIG.block_size, V: int = CONFIG.vocab_size):
    """(x, y), each (B, T): sequences start + stride * t (mod V), y the next token after each of x."""
    start = rng.integers(0, V, (batch_size, 1))
    stride = rng.choice(STRIDES, (batch_size, 1))
    tokens = (start + stride * np.arange(T + 1)) % V  # (B, T + 1)
    return tokens[:, :-1], tokens[:, 1:]


def held_out_loss(params: dict, x, y) -> float:
    """The mean cross-entropy of a tiny GPT with ``params`` on (x, y), by minilora's reference layers.

    The grader's measure of a trained model: it runs in the grader's process on the parameters
    ``train_tiny_gpt`` hands back, so no layer or loss of the submission enters it.
    """
    model = GPT(CONFIG, params)
    model.ops = REFERENCE_OPS
    return float(model.forward(x, y)[1])


def train_tiny_gpt(seed: int, steps: int = STEPS) -> dict:
    """Train the tiny GPT from weights and batches drawn from ``seed``; see the module docstring.

    Returns {"params": the trained parameters (float32, by name), "losses": the training loss of
    every step (before its update), "eval_before" and "eval_after": the loss on EVAL_SEQUENCES
    held-out sequences before and after training, "layers": the a1-a3 files used, "optim": where the
    optimiser came from}. The grader uses only "params" (and "layers" in its message).
    """
    optim = optim_module()
    ops, used = layer_ops()
    model = GPT(CONFIG, init_params(CONFIG, seed=seed, dtype=np.float32))
    model.ops = ops
    optimizer = optim.AdamW(
        model.params, model.trainable_names, lr=LR, weight_decay=WEIGHT_DECAY, no_decay=model.no_decay
    )
    rng = np.random.default_rng(seed)  # the training batches
    eval_batch = counting_batch(np.random.default_rng([seed, 1]), EVAL_SEQUENCES)  # held out
    eval_before = float(model.forward(*eval_batch)[1])
    losses = []
    for step in range(steps):
        x, y = counting_batch(rng)  # (B, T) each
        lr = optim.cosine_lr(step, LR, steps, WARMUP_STEPS, MIN_LR)
        loss, cache = model.forward(x, y)[1:]
        grads = model.backward(cache)
        optim.clip_grad_norm(grads, GRAD_CLIP)
        optimizer.step(grads, lr)
        losses.append(float(loss))
    return {
        "params": model.params,
        "losses": losses,
        "eval_before": eval_before,
        "eval_after": float(model.forward(*eval_batch)[1]),
        "layers": used,
        "optim": "optim.py" if beside("optim") else "minilora",
    }


def adamw_steps(params: dict, grad_steps: list, lrs: list, **adamw_kwargs) -> list:
    """Your AdamW on copies of ``params``: one step per (grads, lr); the parameters after each step.

    ``adamw_kwargs`` go to ``AdamW(params, names, ...)`` (betas, eps, weight_decay, decay_names,
    lr_scale); the GPT's embeddings are left undecayed, as in training (``no_decay=GPT.no_decay``).
    The gradients go to the step as given, not copied: a step updates its parameters in place and
    must leave its gradients as they were (a training loop may log them, or accumulate into them).
    """
    params = {name: np.array(value, copy=True) for name, value in params.items()}
    optimizer = optim_module().AdamW(params, list(params), **{"no_decay": GPT.no_decay, **adamw_kwargs})
    after = []
    for grads, lr in zip(grad_steps, lrs, strict=True):
        optimizer.step(grads, lr)
        after.append({name: value.copy() for name, value in params.items()})
    return after


def rate_times(update, *schedule_args) -> object:
    """Your cosine_lr(*schedule_args) times ``update``, multiplied here, where the rate's own type counts.

    A NumPy float64 rate crosses to the grader as a plain number; here it still promotes a float32
    update to float64, as it would every update of a training run.
    """
    return optim_module().cosine_lr(*schedule_args) * update


def clip_copies(grads: dict, max_norm: float):
    """Your clip_grad_norm on copies of ``grads``: (the clipped copies, the norm it returned)."""
    grads = {name: np.array(g, copy=True) for name, g in grads.items()}
    total_norm = optim_module().clip_grad_norm(grads, max_norm)
    return grads, np.asarray(total_norm)


def scale_copies(arrays: list, total_norm, max_norm: float) -> list:
    """Your scale_to_norm on copies of ``arrays``: the copies, after it scaled them.

    It gets a list of its own: the arrays must change in place, as clip_grad_norm's list of a
    dict's values does, not be replaced in the list. ``total_norm`` goes as given, and must stay.
    """
    copies = [np.array(a, copy=True) for a in arrays]
    optim_module().scale_to_norm(list(copies), total_norm, max_norm)
    return copies


if __name__ == "__main__":
    result = train_tiny_gpt(seed=0)
    print(f"optimiser from {result['optim']}; your layers: {', '.join(result['layers']) or 'none'}")
    for step in range(0, len(result["losses"]), 10):
        print(f"step {step:3d}: training loss {result['losses'][step]:.4f}")
    print(f"held-out loss: {result['eval_before']:.4f} before, {result['eval_after']:.4f} after")
