"""The assignments: what each teaches and which of the library's files it opens."""

from __future__ import annotations

from dataclasses import dataclass

ANSWERS_FILE = "answers.md"  # the written answers: a release writes the template, the student hands it back
A1_TO_A3_FILES = ("linear.py", "gelu.py", "cross_entropy.py", "layernorm.py", "embedding.py", "attention.py")


@dataclass(frozen=True)
class Assignment:
    id: str
    title: str
    teaches: str
    sources: tuple  # library files, relative to the minilora package, whose holes this assignment opens
    optional: tuple = (ANSWERS_FILE,)  # handed in beside student/, graded by hand; missing costs no part


ASSIGNMENTS = {
    "a1": Assignment(
        "a1",
        "Linear, GELU and softmax cross-entropy",
        "the three simplest forward/backward pairs, and checking a backward by finite differences",
        ("layers/linear.py", "layers/gelu.py", "layers/cross_entropy.py"),
    ),
    "a2": Assignment(
        "a2",
        "LayerNorm and embeddings",
        "a backward with three chain-rule terms, and why an embedding's backward is a scatter-add",
        ("layers/layernorm.py", "layers/embedding.py"),
    ),
    "a3": Assignment(
        "a3",
        "Causal self-attention",
        "batched multi-head attention, the causal mask and the softmax backward",
        ("layers/attention.py",),
    ),
    "a4": Assignment(
        "a4",
        "The whole model's backward",
        "residual fan-out, the tied embedding, and a gradient check of a whole GPT",
        ("model.py",),
    ),
    "a5": Assignment(
        "a5",
        "The LoRA layer and merging",
        "LoRA's forward and its derived backward (dx, dlora_A, dlora_B), the scale, and merging into W",
        ("lora/layer.py",),
    ),
    "a6": Assignment(
        "a6",
        "Training: AdamW, clipping and the learning-rate schedule",
        "AdamW's bias correction and decoupled weight decay, global gradient clipping, warmup and cosine "
        "decay, and a tiny GPT trained by your optimiser on your own a1-a3 layers",
        ("optim.py", "assignments/train_tiny.py"),
        optional=(ANSWERS_FILE, *A1_TO_A3_FILES),  # the student's own layers train the tiny GPT where present
    ),
    "a7": Assignment(
        "a7",
        "LoRA variants: DoRA, rsLoRA and PiSSA",
        "DoRA's backward with its weight norm held constant and through it, rsLoRA's rank-stable scale, "
        "and PiSSA's start from the top singular directions of W",
        ("lora/dora.py", "lora/layer.py", "lora/init.py"),
    ),
}


def get_assignment(assignment_id: str) -> Assignment:
    if assignment_id not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {assignment_id!r}; choose one of {sorted(ASSIGNMENTS)}")
    return ASSIGNMENTS[assignment_id]


def later_than(assignment_id: str) -> list[str]:
    """The assignments after this one, in catalog order: their answers are not out yet when it is."""
    ids = list(ASSIGNMENTS)
    return ids[ids.index(get_assignment(assignment_id).id) + 1 :]
