"""Submissions that attack the grader from the operating system, each run as a real child process.

Each attack sits at the top of a blank a1 release's student/linear.py, so it runs when the child
imports the file; it earns points only if the attack works (a blank release scores zero, and the
environment and guard attacks bring their answers only if they reach what they look for). Every
attack must score zero: a run the grader refuses to count ("not graded") is a zero too. They run at
the strongest isolation level this machine allows, and the attacks a same-user grader must survive
at the ``process`` level too.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest

from minilora.assignments import grading
from minilora.assignments.grading import NotGraded, grade, grade_roster
from minilora.assignments.isolation import Isolation, RefusedToGrade, choose_isolation
from minilora.assignments.release import release
from minilora.assignments.sandbox import PACKAGE_DIR

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the attacks read /proc (Linux)")

BEST = choose_isolation()
QUICK = "linear_forward_on_drawn_inputs"  # one part is enough for an attack that runs at import
PROCESS = Isolation("process")
CONFTEST = PACKAGE_DIR / "assignments" / "graders" / "conftest.py"
LINEAR_BY_HAND = """
def linear_forward(x, W, b=None):
    out = x @ W
    return (out if b is None else out + b), (x, W, b is not None)
"""


def attacked_release(tmp_path, attack: str, name="attacker"):
    """A blank a1 release whose linear.py runs ``attack`` when it is imported, after its own code (so
    what the attack defines replaces the holes)."""
    folder = release("a1", tmp_path / name)
    linear = folder / "student" / "linear.py"
    linear.write_text(linear.read_text() + "\n" + attack)
    return folder


def earned(folder, isolation, **kwargs) -> int:
    """The points a grading run gives, zero when the grader refused to count it."""
    try:
        return grade("a1", folder, seed=1, isolation=isolation, parts=QUICK, **kwargs).earned
    except NotGraded:
        return 0


FORGED_SCORE = """
import json, os, re, signal
parent = os.getppid()
try:
    argv = open(f"/proc/{parent}/cmdline").read().split("\\0")
    fd = next(int(re.sub(r"\\D", "", a)) for a in argv if a.startswith("--score-fd"))
    parts = [{"name": "test_all", "points": 18, "earned": 18, "outcome": "passed", "error": "", "message": ""}]
    with open(f"/proc/{parent}/fd/{fd}", "w") as pipe:
        json.dump({"seed": 1, "nonce": "", "parts": parts}, pipe)
    os.kill(parent, signal.SIGKILL)
except Exception:
    pass
"""


@pytest.mark.parametrize("isolation", [BEST, PROCESS], ids=["best", "process"])
def test_a_score_forged_through_the_parents_descriptors_and_a_killed_grader_count_nothing(
    tmp_path, isolation
):
    assert earned(attacked_release(tmp_path, FORGED_SCORE), isolation) == 0


SURVIVOR = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(3)
        open({marker!r}, "w").write("survived")
    os._exit(0)
"""


@pytest.mark.parametrize("isolation", [BEST, PROCESS], ids=["best", "process"])
def test_a_grandchild_that_left_the_session_does_not_outlive_its_part(tmp_path, isolation):
    marker = tmp_path / "survived.txt"
    assert (
        earned(attacked_release(tmp_path, SURVIVOR.replace("{marker!r}", repr(str(marker)))), isolation) == 0
    )
    time.sleep(4)
    assert not marker.exists(), "a process of the submission was still running after grading"


def tamper(conftest) -> str:
    """An attack that appends a hook to the grader file ``conftest``."""
    return f"""
try:
    with open({str(conftest)!r}, "a") as grader:
        grader.write("\\nRESULTS.clear()  # tampered\\n")
except OSError:
    pass
"""


TAMPER = tamper(CONFTEST)


def test_a_submission_cannot_change_an_installed_grader(tmp_path):
    if BEST.level == "process":
        pytest.skip("a same-user child can write the grader; the process-level test covers it")
    before = CONFTEST.read_bytes()
    try:
        assert earned(attacked_release(tmp_path, TAMPER), BEST) == 0
    finally:
        changed = CONFTEST.read_bytes() != before
        CONFTEST.write_bytes(before)
    assert not changed, "the child wrote to the installed grader"


REGRADE_IN_A_COPY = """
import sys
from minilora.assignments.grading import grade
from minilora.assignments.isolation import Isolation, RefusedToGrade
from minilora.assignments.release import release
for folder in (sys.argv[1], release("a1", sys.argv[2], solved=True)):  # the attacker, then a classmate
    try:
        grade("a1", folder, seed=1, isolation=Isolation("process"), parts=sys.argv[3])
        print("graded")
    except RefusedToGrade as err:
        print(err)
"""


def test_a_grader_changed_by_a_same_user_submission_is_refused_now_and_on_the_regrade(tmp_path):
    """The attack really writes the grader it runs under, so it runs against a copy of the package
    in a process of its own: the installed one, which other tests grade with meanwhile, stays whole."""
    install = tmp_path / "install"
    shutil.copytree(PACKAGE_DIR, install / "minilora", ignore=shutil.ignore_patterns("__pycache__"))
    copied_conftest = install / "minilora" / CONFTEST.relative_to(PACKAGE_DIR)
    folder = attacked_release(tmp_path, tamper(copied_conftest))
    result = subprocess.run(
        [sys.executable, "-c", REGRADE_IN_A_COPY, str(folder), str(tmp_path / "classmate"), QUICK],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(install)},
    )  # fmt: skip
    assert "tampered" in copied_conftest.read_text(), result.stderr  # the attack did reach the copy
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("conftest.py changed" in line for line in lines), (
        result.stdout + result.stderr
    )


VANDAL = """
import glob
for path in glob.glob({roster!r} + "/*/student/linear.py"):
    try:
        open(path, "w").write("raise SystemExit")
    except OSError:
        pass
"""


@pytest.mark.parametrize("isolation", [BEST, PROCESS], ids=["best", "process"])
def test_a_submission_cannot_change_what_a_classmate_is_graded_on(tmp_path, isolation, monkeypatch):
    roster = tmp_path / "roster"
    attacked_release(roster, VANDAL.replace("{roster!r}", repr(str(roster))), name="a_mallory")
    release("a1", roster / "b_alice", solved=True)
    results = grade_roster("a1", roster, seed=1, isolation=isolation, parts=QUICK)
    assert results["b_alice"].earned == results["b_alice"].total


SECRET_NAME = "MINILORA_TEST_COURSE_SECRET"
SNOOP = f"""
import glob, os
def _visible():
    if {SECRET_NAME!r} in os.environ:
        return True
    for path in glob.glob("/proc/*/environ"):
        try:
            if {SECRET_NAME!r}.encode() in open(path, "rb").read():
                return True
        except OSError:
            pass
    return False
if _visible():
{LINEAR_BY_HAND.replace(chr(10), chr(10) + "    ")}
"""


def test_a_secret_in_the_graders_environment_is_out_of_the_childs_reach(tmp_path, monkeypatch):
    if os.geteuid() == 0 and BEST.level == "process":
        pytest.skip("root reads every /proc/*/environ; as root the grader runs at the user level or better")
    monkeypatch.setenv(SECRET_NAME, "s3cret")
    folder = attacked_release(tmp_path, SNOOP)
    assert earned(folder, BEST) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the root fallback exists only for a grader running as root")
def test_as_root_without_a_sandbox_user_nothing_runs(tmp_path, monkeypatch):
    with pytest.raises(RefusedToGrade, match="no sandbox user 'no-such-user-here'"):
        choose_isolation("no-such-user-here")
    monkeypatch.setenv("MINILORA_SANDBOX_USER", "no-such-user-here")
    with pytest.raises(RefusedToGrade, match="refusing to grade as root"):
        grade("a1", release("a1", tmp_path / "blank"), seed=1, parts=QUICK)


BYPASSES = {
    "exec_of_the_installed_source": """
import inspect, minilora.layers.linear as _reference
exec(compile(inspect.getsource(_reference), "copy", "exec"))
""",
    "renamed_code_object": """
import types, minilora.layers.linear as _reference
_code = _reference.linear_forward.__code__.replace(co_name="mine")
linear_forward = types.FunctionType(_code, _reference.__dict__)
""",
    "profile_switched_off": """
import sys, minilora.layers.linear as _reference
def linear_forward(*args, **kwargs):
    sys.setprofile(None)
    return _reference.linear_forward(*args, **kwargs)
""",
    "called_from_a_thread": """
import concurrent.futures, minilora.layers.linear as _reference
def linear_forward(*args, **kwargs):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_reference.linear_forward, *args, **kwargs).result()
""",
    "source_read_by_path": f"""
try:
    exec(compile(open({str(PACKAGE_DIR / "layers" / "linear.py")!r}).read(), "copy", "exec"))
except OSError:
    pass
""",
}


@pytest.mark.parametrize("bypass", sorted(BYPASSES))
def test_minilora_s_own_bodies_are_out_of_the_childs_reach(tmp_path, bypass):
    if bypass == "source_read_by_path" and BEST.level != "namespaces":
        pytest.skip("only the namespaces level hides the installed files (docs/instructors.md)")
    folder = attacked_release(tmp_path, BYPASSES[bypass])
    score = grade("a1", folder, seed=1, isolation=BEST, parts="linear")
    linear_parts = [part for part in score.parts if "linear" in part["name"]]
    assert linear_parts and all(part["earned"] == 0 for part in linear_parts), score.table()


def test_the_score_names_the_isolation_level_it_ran_at(tmp_path):
    score = grade("a1", release("a1", tmp_path / "blank"), seed=1, isolation=BEST, parts=QUICK)
    assert score.isolation == BEST.describe() and f"isolation: {BEST.level}" in score.table()


def test_the_child_gets_a_minimal_environment_and_its_own_session(tmp_path):
    """Seen from inside: the child reports what it has through the one channel it has, its return value."""
    folder = release("a1", tmp_path / "probe")
    (folder / "student" / "gelu.py").write_text(
        "import os\ndef gelu_forward(x):\n    return sorted(os.environ), os.getsid(0) == os.getpid()\n"
    )
    from minilora.assignments.sandbox import StudentProcess
    from minilora.assignments.student_build import write_student_package

    build = grading.readable(write_student_package(tmp_path / "build", ["a1"]))
    process = StudentProcess(folder, build, PROCESS)
    try:
        names, own_session = process["gelu"].gelu_forward(1.0)
    finally:
        process.close()
    assert set(names) <= {
        "PATH",
        "LANG",
        "HOME",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
    }
    assert own_session, "the child is not the leader of a session of its own"


COMPLEX_STEP = '''
def gelu_backward(dout, cache):
    """The derivative by complex-step differentiation of the student's own forward: exact, no formula."""
    h = 1e-30
    return dout * (gelu_forward(cache.x + 1j * h)[0].imag / h).astype(cache.x.dtype)
'''


def test_a_backward_by_complex_step_differentiation_of_its_own_forward_loses_the_call_budget_part(tmp_path):
    folder = release("a1", tmp_path / "complex_step", solved=True)
    gelu = folder / "student" / "gelu.py"
    gelu.write_text(gelu.read_text() + COMPLEX_STEP)
    score = grade("a1", folder, seed=1, isolation=BEST, parts="gelu_backward or runs_its_forward")
    budget = [part for part in score.parts if part["name"] == "test_no_backward_runs_its_forward"]
    assert budget and budget[0]["earned"] == 0 and "gelu_backward ran gelu_forward" in budget[0]["message"]
    fd = [part for part in score.parts if part["name"] == "test_gelu_backward_matches_finite_differences"]
    assert fd and fd[0]["earned"] == fd[0]["points"]  # the stated limit: its numbers alone are right


def fixed_a4_gradients() -> dict:
    """The gradients of the one model, batch and dropout seed that the 0.2 grader of a4 always used."""
    import numpy as np

    from minilora.config import GPTConfig
    from minilora.model import GPT, init_params

    CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=7, dropout=0.1)  # a4's model
    params = init_params(CONFIG, seed=0, dtype=np.float64)
    noise = np.random.default_rng(1)
    for value in params.values():
        value += 0.1 * noise.standard_normal(value.shape)
    batch = np.random.default_rng(5)
    idx, targets = batch.integers(0, 7, (2, 5)), batch.integers(0, 7, (2, 5))
    model = GPT(CONFIG, params)
    cache = model.forward(idx, targets, dropout_rng=np.random.default_rng(3))[2]
    return {name: grad.tolist() for name, grad in model.backward(cache).items()}


def test_a_table_of_gradients_made_offline_for_fixed_inputs_scores_nothing(tmp_path):
    folder = release("a4", tmp_path / "table", solved=True)
    model = folder / "student" / "model.py"
    model.write_text(
        model.read_text()
        + f"\n_TABLE = {fixed_a4_gradients()!r}\n"
        + "def _looked_up(self, cache, dloss=1.0):\n"
        + "    import numpy\n"
        + "    return {name: dloss * numpy.array(_TABLE[name]) for name in self.params if name not in self.frozen}\n"
        + "GPT.backward = _looked_up\n"
    )
    score = grade("a4", folder, seed=1, isolation=BEST, parts="finite_differences or without_dropout")
    assert len(score.parts) == 2 and score.earned == 0, score.table()


SELF_REPORT = '''
def train_tiny_gpt(seed, steps=None):
    """No training at all: the starting weights, with the report a trained run would give."""
    import numpy
    from minilora.model import init_params

    params = init_params(CONFIG, seed=seed, dtype=numpy.float32)
    return {"params": params, "losses": [0.01], "eval_before": 3.0, "eval_after": 0.01, "layers": [],
            "optim": "optim.py"}
'''


def test_a_training_run_that_reports_its_own_success_scores_nothing(tmp_path):
    folder = release("a6", tmp_path / "self_report")
    train_tiny = folder / "student" / "train_tiny.py"
    train_tiny.write_text(train_tiny.read_text() + SELF_REPORT)
    score = grade("a6", folder, seed=1, isolation=BEST, parts="tiny_gpt")
    (training,) = score.parts
    assert training["earned"] == 0 and "held-out loss fell less than" in training["message"], score.table()
