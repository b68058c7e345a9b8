"""Declare, don't detect, checked from the source: no consumer tests which family, format or cache it has.

Read with ``ast`` (nothing is imported): no ``isinstance(..., LlamaConfig)`` anywhere in minilora, no
test of ``QuantizedWeight`` (or of a quantized cache) inside any backward, and the step's tail,
clipping then the optimiser's step, written only in ``apply_update`` and its fused twin. The last
test plants each fault in a small source text, so the checks cannot pass vacuously.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEP_TAILS = {"apply_update", "fused_apply_update"}  # the one place the tail is written, and its twin
# a6's tiny run trains with the student's own clip_grad_norm and AdamW (their optim.py), not the library's
STUDENT_RUNS = {"minilora/assignments/train_tiny.py:train_tiny_gpt"}
CLIPS = {"clip_grad_norm", "fused_clip_grad_norm"}
UPDATES = {"step", "optimizer_step", "fused_adamw_step"}


def _called_name(node: ast.Call) -> str | None:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _isinstance_targets(node: ast.Call) -> set[str]:
    """The class names an ``isinstance(x, A)`` or ``isinstance(x, (A, B))`` call tests against."""
    if _called_name(node) != "isinstance" or len(node.args) != 2:
        return set()
    classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
    return {c.attr if isinstance(c, ast.Attribute) else getattr(c, "id", "") for c in classes}


def findings(source: str, where: str) -> list[str]:
    """Every detection this source commits, as 'where:line: what' lines."""
    found = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        calls = [node for node in ast.walk(func) if isinstance(node, ast.Call)]
        for call in calls:
            tested = _isinstance_targets(call)
            if "LlamaConfig" in tested:
                found.append(f"{where}:{call.lineno}: isinstance(..., LlamaConfig) in {func.name}")
            quantized = {name for name in tested if name.startswith("Quantized")}
            if quantized and "backward" in func.name:
                found.append(f"{where}:{call.lineno}: {func.name} tests {sorted(quantized)}")
        names = {_called_name(call) for call in calls}
        exempt = func.name in STEP_TAILS or f"{where}:{func.name}" in STUDENT_RUNS
        if names & CLIPS and names & UPDATES and not exempt:
            found.append(f"{where}:{func.lineno}: {func.name} clips and steps (write apply_update instead)")
    return found


def test_no_consumer_detects_a_family_a_format_or_writes_the_step_tail_again():
    found = []
    for path in sorted((REPO / "minilora").rglob("*.py")):
        found += findings(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert not found, "detections instead of declarations:\n" + "\n".join(found)


def test_the_checker_finds_each_planted_detection():
    planted = """
def lora_shapes(config):
    if isinstance(config, LlamaConfig):
        return 1

def linear_backward(dout, cache):
    if isinstance(cache, (QuantizedLinearCache, int)):
        return dout

def my_step(model, optimizer, grads):
    clip_grad_norm(grads, 1.0)
    optimizer.step(grads)

def apply_update(optimizer, grads, lr, clip):
    clip_grad_norm(grads, clip)
    optimizer.step(grads, lr)

def forward(x, weight):
    return isinstance(weight, QuantizedWeight)  # a forward may choose at entry: not a finding
"""
    found = findings(planted, "toy.py")
    assert len(found) == 3, found
    assert "toy.py:3: isinstance(..., LlamaConfig) in lora_shapes" in found[0]
    assert "linear_backward tests ['QuantizedLinearCache']" in found[1]
    assert "toy.py:10: my_step clips and steps" in found[2]
