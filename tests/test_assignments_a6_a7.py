"""a6 (training) and a7 (LoRA variants) beyond the pipeline check that tests/test_assignments.py runs
for every assignment: the student's own a1-a3 files really train a6's tiny GPT, a step that never
learns and a wrong DoRA backward score less than half, and the library's PiSSA is the helper's."""

import shutil

import numpy as np
import pytest

from minilora.assignments.catalog import ASSIGNMENTS
from minilora.assignments.grading import grade
from minilora.assignments.pipeline import planted_bugs
from minilora.assignments.release import STUDENT_DIR, load_student, release
from minilora.assignments.train_tiny import LAYER_FILES, train_tiny_gpt

SEED = 20261202


def part(score, name):
    (found,) = [p for p in score.parts if p["name"] == name]
    return found


def edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path.name}"
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize("assignment_id", ["a6", "a7"])
def test_a6_and_a7_are_in_the_catalog_with_at_least_five_planted_bugs(assignment_id):
    assert assignment_id in ASSIGNMENTS
    assert len(planted_bugs(assignment_id)) >= 5


def a6_with_the_a1_to_a3_files(folder):
    """A solved a6 release with the solved a1-a3 files copied beside it, as the handout asks."""
    release("a6", folder, solved=True)
    for assignment_id in ("a1", "a2", "a3"):
        release(assignment_id, folder.parent / assignment_id, solved=True)
        for path in (folder.parent / assignment_id / STUDENT_DIR).glob("*.py"):
            shutil.copy(path, folder / STUDENT_DIR / path.name)
    return folder


def test_the_tiny_gpt_trains_on_the_a1_to_a3_files_beside_it(tmp_path):
    """The reference layers' copies give the library's run bit for bit; one changed layer changes it."""
    library = train_tiny_gpt(SEED)
    assert library["optim"] == "minilora" and library["layers"] == []
    assert library["eval_after"] < 0.5 * library["eval_before"]  # it learns: from ln 16 to about 1
    folder = a6_with_the_a1_to_a3_files(tmp_path / "a6")
    own = load_student(folder)["train_tiny"].train_tiny_gpt(SEED)
    assert own["optim"] == "optim.py"
    assert sorted(own["layers"]) == sorted(f"{stem}.py" for stem in LAYER_FILES)
    assert own["losses"] == library["losses"] and own["eval_after"] == library["eval_after"]
    edit(folder / STUDENT_DIR / "gelu.py", "out = 0.5 * x * (1.0 + t)", "out = 0.4 * x * (1.0 + t)")
    changed = load_student(folder)["train_tiny"].train_tiny_gpt(SEED)
    assert changed["losses"][0] != library["losses"][0]  # the student's GELU ran


def test_a_broken_a1_layer_beside_the_optimiser_costs_the_training_part_only(tmp_path):
    folder = a6_with_the_a1_to_a3_files(tmp_path / "a6")
    edit(  # a1 handed in with the gradient's sign flipped: every step climbs the loss
        folder / STUDENT_DIR / "cross_entropy.py",
        "dlogits = (cache.probs - onehot) * (dloss * cache.weights[:, None])",
        "dlogits = (onehot - cache.probs) * (dloss * cache.weights[:, None])",
    )
    score = grade("a6", folder, seed=SEED)
    training = part(score, "test_a_tiny_gpt_trained_with_your_optimiser_reaches_the_reference_loss")
    assert training["earned"] == 0 and training["error"] == "AssertionError"
    assert "cross_entropy.py" in training["message"]  # the failure names the student's files it trained with
    assert score.earned == score.total - training["points"]


def test_a_step_that_never_learns_scores_zero_on_training_and_less_than_half(tmp_path):
    release("a6", tmp_path, solved=True)
    edit(tmp_path / STUDENT_DIR / "optim.py", "p -= step_size * (m / denom)", "p -= 0.0 * (m / denom)")
    score = grade("a6", tmp_path, seed=SEED)
    training = part(score, "test_a_tiny_gpt_trained_with_your_optimiser_reaches_the_reference_loss")
    assert training["earned"] == 0 and "held-out loss" in training["message"]
    assert score.earned < score.total / 2, score.table()


def test_a_wrong_dora_backward_scores_less_than_half(tmp_path):
    release("a7", tmp_path, solved=True)
    edit(tmp_path / STUDENT_DIR / "dora.py", "du = dout * (m / n)", "du = dout * m")
    score = grade("a7", tmp_path, seed=SEED)
    assert score.earned < score.total / 2, score.table()


def test_pissa_starts_at_the_base_from_the_helpers_factors():
    from minilora.lora.config import LoraConfig
    from minilora.lora.init import init_pissa_factors, pissa_factors

    rng = np.random.default_rng(0)
    W = rng.standard_normal((7, 5))
    config = LoraConfig(r=2, lora_alpha=4.0, use_rslora=True)
    factors, residuals = init_pissa_factors(config, {"m": W})
    lora_A, lora_B = pissa_factors(W, 2, config.scaling)
    np.testing.assert_array_equal(factors["m.lora_A"], lora_A)
    np.testing.assert_array_equal(factors["m.lora_B"], lora_B)
    start = residuals["m.weight"] + config.scaling * lora_A.T @ lora_B.T
    np.testing.assert_allclose(start, W, rtol=0, atol=1e-13)
