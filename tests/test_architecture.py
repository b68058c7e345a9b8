"""The layout's rule, checked from the source: the reference never imports the fast path, and nothing cycles.

llm.c keeps the clean reference (``train_gpt2.c``) apart from the code that specialises it; minilora
does the same inside one package (minilora/fast/__init__.py describes the seams). These tests read
every ``.py`` file under ``minilora/`` with ``ast`` (nothing is imported, so they run
without CuPy or PyTorch) and build the import graph:

- a node is a module; a package's ``__init__.py`` is the package's module (``minilora.training``);
- an edge is one import statement, with its file and line. Imports inside a function (lazy imports)
  are edges too, marked lazy; so are ``importlib.import_module("literal")`` calls and imports under
  ``if TYPE_CHECKING:`` (they do not run at import time, so they count as lazy);
- ``from pkg import name`` is an edge to ``pkg.name`` when that is a module or package file, else to
  ``pkg``; relative imports are resolved against the importing file;
- implied edges: importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first. We add the
  edge to each such parent package, except the packages that enclose the importer: those have already
  run (or are running) by the time the importer's body runs, so the edge says nothing and would only
  add a fake cycle between every package ``__init__`` and its own submodules. This also leaves out
  ``minilora/__init__.py``, the facade that re-exports the public API from every folder (training's
  ``fit`` included): it encloses every module. The edge that remains is useful: when a reference
  module imports ``minilora.training.loop``, ``minilora/training/__init__.py`` runs too, and if that
  file imported the fine-tuning job the reference would load the fast path without naming it.

The tests then ask: does any reference module reach the fast path (or the lab, the CLI, the
assignments, the jobs), directly or through a chain; is there any cycle; does anything but the
PyTorch peer import ``torch``; do the layer files import only the backend and each other. The last
test feeds the checker a small package with planted faults, so the others cannot pass vacuously.
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "minilora"

# The reference: plain array-API code that reads as its formulas. A name ending in ".*"
# means every module below that package, the package's own __init__ included.
REFERENCE = (
    "minilora.config",
    "minilora.backend",
    "minilora.layers.*",
    "minilora.language_model",
    "minilora.model",
    "minilora.llama",
    "minilora.optim",
    "minilora.gradcheck",
    "minilora.generate",
    "minilora.lora.*",
    "minilora.quant.*",
    "minilora.training.*",
)

# What sits above the reference and plugs into it: the reference must not reach any of these.
ABOVE_REFERENCE = (
    "minilora.fast.*",
    "minilora.lab.*",
    "minilora.cli.*",
    "minilora.assignments.*",
    "minilora.jobs.finetune",
    "minilora.jobs.pretrain",
)

TORCH_PEER = "minilora.lab.torch_peer"
PEFT_PEER = "minilora.lab.peft_peer"  # transformers + PEFT, the SmolLM2 bench's peer
PEERS = (TORCH_PEER, PEFT_PEER)
PEER_LIBRARIES = ("torch", "transformers", "peft")


@dataclass(frozen=True)
class Import:
    """One edge of the import graph: ``importer`` imports ``target`` at ``path:line``."""

    importer: str  # dotted module name of the importing file
    target: str  # dotted, absolute name of what is imported (a minilora module, or e.g. "numpy")
    path: Path
    line: int
    lazy: bool  # inside a function (or under TYPE_CHECKING): does not run when the importer is imported
    implied: bool = False  # a parent package's __init__ that the statement runs without naming it

    def where(self, root: Path) -> str:
        kind = " (implied parent package)" if self.implied else ""
        kind += " (lazy)" if self.lazy else ""
        return f"{_rel(self.path, root)}:{self.line}{kind}"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _matches(module: str, patterns) -> bool:
    for pattern in patterns:
        if pattern.endswith(".*"):
            base = pattern[:-2]
            if module == base or module.startswith(base + "."):
                return True
        elif module == pattern:
            return True
    return False


def discover_modules(package_dir: Path) -> dict[str, Path]:
    """Every module file below ``package_dir``, keyed by dotted name (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


class _ImportVisitor(ast.NodeVisitor):
    """Collects the raw import statements of one file, each tagged lazy when inside a function."""

    def __init__(self):
        self.found = []  # (kind, module, names, level, line, lazy)
        self._depth = 0  # how many function bodies (or TYPE_CHECKING blocks) enclose the node

    def _nested(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_If(self, node):
        test = node.test
        type_checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        if not type_checking:
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._depth += 1
        for child in node.body:
            self.visit(child)
        self._depth -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append(("import", alias.name, (), 0, node.lineno, self._depth > 0))

    def visit_ImportFrom(self, node):
        names = tuple(alias.name for alias in node.names)
        self.found.append(("from", node.module or "", names, node.level, node.lineno, self._depth > 0))

    def visit_Call(self, node):
        # importlib.import_module("a.b") and __import__("a.b") with a literal name are imports too.
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            self.found.append(("import", node.args[0].value, (), 0, node.lineno, self._depth > 0))
        self.generic_visit(node)


def collect_imports(package_dir: Path) -> tuple[dict[str, Path], list[Import]]:
    """Parse every module below ``package_dir``; return the modules and every import edge."""
    modules = discover_modules(package_dir)
    package = package_dir.name
    # Folders count as packages even without an __init__.py (namespace packages: no node, no code).
    folders = {
        ".".join(p.relative_to(package_dir.parent).parts)
        for p in [package_dir, *package_dir.rglob("*")]
        if p.is_dir()
    }

    def is_internal(name):
        return name == package or name.startswith(package + ".")

    def parents_to_run(importer, target):
        # a.b.c runs a/__init__ and a/b/__init__, unless they enclose the importer (already running).
        parts = target.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in modules and not (importer == parent or importer.startswith(parent + ".")):
                yield parent

    edges = []
    for importer, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visitor = _ImportVisitor()
        visitor.visit(tree)
        for kind, module, names, level, line, lazy in visitor.found:
            if level:  # relative: strip (level - 1) components from the importer's package
                base = importer.split(".") if is_pkg else importer.split(".")[:-1]
                base = base[: len(base) - (level - 1)]
                module = ".".join(base + ([module] if module else []))
            if kind == "import":
                targets = [module]
            else:
                targets = []
                for name in names:
                    sub = f"{module}.{name}"
                    if name != "*" and is_internal(sub) and (sub in modules or sub in folders):
                        targets.append(sub)
                    else:
                        targets.append(module)
                # `from pkg import mod` also runs pkg/__init__: an implied parent of pkg.mod, added below
            seen = set()
            for target in targets:
                implied = [] if not is_internal(target) else list(parents_to_run(importer, target))
                for name, is_implied in [(target, False)] + [(p, True) for p in implied]:
                    if name in seen or name == importer:
                        continue
                    if is_implied and name in targets:
                        continue
                    if not is_implied and is_internal(name) and name not in modules and name in folders:
                        continue  # a namespace package has no code to run
                    seen.add(name)
                    edges.append(Import(importer, name, path, line, lazy, is_implied))
    return modules, edges


def internal_graph(modules, edges, *, include_lazy=True):
    graph = {m: [] for m in modules}
    for e in edges:
        if e.target in modules and (include_lazy or not e.lazy):
            graph[e.importer].append(e)
    return graph


def forbidden_chains(modules, edges, reference, above):
    """For every reference module, each module from ``above`` it reaches, with the shortest chain.

    The search follows every edge (lazy and implied ones too: a lazy import is still code the
    reference runs) and does not walk on from a forbidden module: the first one on a path is the
    finding. Returns ``(reference module, [edge, ...])`` pairs, the chain's last edge crossing the line.
    """
    graph = internal_graph(modules, edges)
    found = []
    for start in sorted(m for m in modules if _matches(m, reference)):
        came_from = {start: None}  # module -> the edge that first reached it
        queue = deque([start])
        while queue:
            here = queue.popleft()
            if _matches(here, above):
                continue
            for e in graph[here]:
                if e.target not in came_from:
                    came_from[e.target] = e
                    queue.append(e.target)
        for target in sorted(m for m in came_from if _matches(m, above)):
            chain, node = [], target
            while came_from[node] is not None:
                chain.append(came_from[node])
                node = came_from[node].importer
            found.append((start, chain[::-1]))
    return found


def describe_chain(start, chain, modules, root):
    steps = " -> ".join([start] + [e.target for e in chain])
    hops = "; ".join(f"{e.importer} imports {e.target} at {e.where(root)}" for e in chain)
    kind = "directly" if len(chain) == 1 else f"through {len(chain) - 1} module(s)"
    return (
        f"{_rel(modules[start], root)}:{chain[0].line} reaches {chain[-1].target} {kind}: {steps}  [{hops}]"
    )


def forbidden_reaches(modules, edges, reference, above, root):
    """``forbidden_chains`` as messages: file and line of the first hop, the chain, each hop's line."""
    return [
        describe_chain(start, chain, modules, root)
        for start, chain in forbidden_chains(modules, edges, reference, above)
    ]


def find_cycles(modules, edges, *, include_lazy=True, limit=200):
    """Every elementary cycle of the internal import graph, each as its list of edges in order.

    Strongly connected components first (Tarjan), then the simple cycles inside each (Johnson's idea,
    without the blocking optimisation: the graph is small). A cycle is reported once, starting at its
    smallest module name. ``limit`` caps the count so a tangle cannot hang the test.
    """
    graph = internal_graph(modules, edges, include_lazy=include_lazy)
    succ = {m: {} for m in modules}
    for m, out in graph.items():
        for e in out:
            succ[m].setdefault(e.target, e)  # one edge per pair is enough to name the cycle

    index, low, on_stack, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def strongconnect(v):  # iterative Tarjan
        work = [(v, iter(sorted(succ[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == node:
                        break
                sccs.append(comp)

    for v in sorted(modules):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in sccs:
        if len(comp) == 1 and next(iter(comp)) not in succ[next(iter(comp))]:
            continue
        for start in sorted(comp):
            # cycles through `start` that use only nodes >= start (so each is found once)
            path, seen = [start], {start}
            todo = [iter(sorted(w for w in succ[start] if w in comp and w >= start))]
            while todo and len(cycles) < limit:
                w = next(todo[-1], None)
                if w is None:
                    todo.pop()
                    seen.discard(path.pop())
                    continue
                if w == start:
                    nodes = path + [start]
                    cycles.append([succ[a][b] for a, b in itertools.pairwise(nodes)])
                elif w not in seen:
                    path.append(w)
                    seen.add(w)
                    todo.append(iter(sorted(x for x in succ[w] if x in comp and x >= start)))
    return cycles


def describe_cycle(cycle, root):
    names = " -> ".join([cycle[0].importer] + [e.target for e in cycle])
    hops = "; ".join(f"{e.importer} imports {e.target} at {e.where(root)}" for e in cycle)
    return f"{names}  [{hops}]"


@pytest.fixture(scope="module")
def graph():
    return collect_imports(REPO / PACKAGE)


def test_checker_sees_the_package(graph):
    modules, edges = graph
    # Guard against a silently empty graph (wrong root, every file skipped).
    for name in (
        "minilora",
        "minilora.model",
        "minilora.layers.layernorm",
        "minilora.lora.layer",
        "minilora.training.loop",
        "minilora.fast.cuda.kernels",
        *PEERS,
    ):
        assert name in modules, f"{name} not found under {REPO / PACKAGE}"
    assert sum(1 for m in modules if _matches(m, REFERENCE)) >= 15
    assert any(e.importer == "minilora.model" and e.target.startswith("minilora.layers") for e in edges)


def test_every_minilora_import_names_a_module_that_exists(graph):
    # After a move, a stale path (minilora.cuda_kernels, minilora.train) fails here, not at run time.
    modules, edges = graph
    folders = {".".join(p.relative_to(REPO).parts) for p in (REPO / PACKAGE).rglob("*") if p.is_dir()}
    stale = [
        f"{e.where(REPO)}: {e.importer} imports {e.target}, which is no module under minilora/"
        for e in edges
        if (e.target == PACKAGE or e.target.startswith(PACKAGE + "."))
        and e.target not in modules
        and e.target not in folders
    ]
    assert not stale, "imports of modules that do not exist:\n" + "\n".join(stale)


def test_reference_never_imports_the_fast_path_directly(graph):
    _, edges = graph
    direct = [
        f"{e.where(REPO)}: {e.importer} imports {e.target}"
        for e in edges
        if _matches(e.importer, REFERENCE) and _matches(e.target, ABOVE_REFERENCE) and not e.implied
    ]
    assert not direct, (
        "reference modules import code that sits above them (fast path, lab, CLI, assignments, jobs):\n"
        + "\n".join(sorted(direct))
    )


def test_reference_never_reaches_the_fast_path_through_other_modules(graph):
    modules, edges = graph
    found = forbidden_chains(modules, edges, REFERENCE, ABOVE_REFERENCE)
    crossings = sorted({f"{c[-1].where(REPO)}: {c[-1].importer} imports {c[-1].target}" for _, c in found})
    assert not found, (
        f"{len(crossings)} import(s) cross from below the line to above it:\n"
        + "\n".join(crossings)
        + f"\n\n{len(found)} reference module -> forbidden module pair(s), shortest chain each:\n"
        + "\n".join(describe_chain(start, chain, modules, REPO) for start, chain in found)
    )


def test_no_import_cycle_at_module_level(graph):
    # Cycles among the imports that run when a module is imported: the ones that can break an import.
    modules, edges = graph
    cycles = find_cycles(modules, edges, include_lazy=False)
    assert not cycles, (
        f"{len(cycles)} import cycle(s) at module level (the count stops at 200):\n"
        + "\n".join(describe_cycle(c, REPO) for c in cycles)
    )


def test_no_import_cycle_even_through_lazy_imports(graph):
    # A lazy import hides a cycle from the interpreter, not from the design: the two modules still
    # depend on each other, so neither can be read (or replaced) alone.
    modules, edges = graph
    cycles = find_cycles(modules, edges, include_lazy=True)
    assert not cycles, (
        f"{len(cycles)} import cycle(s), lazy imports included (the count stops at 200):\n"
        + "\n".join(describe_cycle(c, REPO) for c in cycles)
    )


def test_only_the_peers_import_torch_transformers_or_peft(graph):
    _, edges = graph
    offenders = [
        f"{e.where(REPO)}: {e.importer} imports {e.target}"
        for e in edges
        if e.target.split(".")[0] in PEER_LIBRARIES and e.importer not in PEERS
    ]
    assert not offenders, f"{PEER_LIBRARIES} imported outside the peers {PEERS}:\n" + "\n".join(offenders)


def test_the_peers_are_imported_only_inside_functions(graph):
    # Importing minilora (or minilora.lab, or the bench) must never import PyTorch; a peer may use the other.
    _, edges = graph
    eager = [
        f"{e.where(REPO)}: {e.importer} imports {e.target} at module level"
        for e in edges
        if e.target in PEERS and not e.lazy and e.importer not in PEERS
    ]
    assert not eager, "a peer imported at module level:\n" + "\n".join(eager)


def test_layer_files_import_only_the_backend_each_other_and_the_stdlib(graph):
    _, edges = graph
    allowed_internal = ("minilora.backend", "minilora.layers.*")
    bad = []
    for e in edges:
        if not _matches(e.importer, ("minilora.layers.*",)) or e.implied:
            continue  # an implied parent is outside the allowed set only when the named module is too
        top = e.target.split(".")[0]
        if top == PACKAGE:
            ok = _matches(e.target, allowed_internal)
        else:
            ok = top in sys.stdlib_module_names
        if not ok:
            bad.append(f"{e.where(REPO)}: {e.importer} imports {e.target}")
    assert not bad, (
        "minilora/layers/ may import only minilora.backend, minilora.layers and the standard library:\n"
        + "\n".join(bad)
    )


def _write(root: Path, files: dict[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_catches_planted_cycles_and_reference_to_fast_imports(tmp_path):
    # A tiny package with one fault of each kind the tests above look for, and a few innocent
    # lookalikes that must not be reported.
    _write(
        tmp_path,
        {
            "toy/__init__.py": "from .core import step\n",  # facade: encloses everything, never a cycle
            "toy/core.py": "from . import helper\nfrom .layers import dense\n\n\ndef step():\n    return helper.h()\n",
            "toy/helper.py": "def h():\n    from .fast.kern import k  # lazy, and two hops from core\n    return k\n",
            "toy/layers/__init__.py": "from .dense import forward\n",
            "toy/layers/dense.py": "import math\nimport numpy\nfrom ..fast import kern\n",  # direct reference -> fast
            "toy/fast/kern.py": "def k():\n    return 0\n",  # fast/ has no __init__.py: a namespace package
            "toy/a.py": "from .b import g\n\n\ndef f():\n    return 1\n",
            "toy/b.py": "from . import a\n\n\ndef g():\n    return a.f()\n",  # a <-> b at module level
            "toy/c.py": "def use():\n    from .d import x\n    return x\n",
            "toy/d.py": "from .c import use\nx = 1\n",  # c <-> d, c's side lazy
            "toy/peer.py": "import torch\n",
            "toy/eager.py": (
                "import importlib\nfrom toy import peer\n\n\n"
                "def later():\n    return importlib.import_module('toy.peer')\n"
            ),
        },
    )
    modules, edges = collect_imports(tmp_path / "toy")
    assert set(modules) >= {
        "toy",
        "toy.core",
        "toy.helper",
        "toy.layers",
        "toy.layers.dense",
        "toy.fast.kern",
    }

    # Resolution: `from . import helper` is the module toy.helper; `from ..fast import kern` is toy.fast.kern.
    assert any(e.importer == "toy.core" and e.target == "toy.helper" and not e.lazy for e in edges)
    assert any(
        e.importer == "toy.layers.dense" and e.target == "toy.fast.kern" and e.line == 3 for e in edges
    )
    lazy = [e for e in edges if e.importer == "toy.helper" and e.target == "toy.fast.kern"]
    assert lazy and lazy[0].lazy and lazy[0].line == 2
    # importing toy.layers.dense from toy.core runs toy/layers/__init__.py: an implied edge
    assert any(e.importer == "toy.core" and e.target == "toy.layers" and e.implied for e in edges)
    # nothing ever imports the facade toy/__init__ implicitly
    assert not any(e.target == "toy" for e in edges)

    reach = forbidden_reaches(modules, edges, ("toy.core", "toy.layers.*"), ("toy.fast.*",), tmp_path)
    assert any(
        "toy.core -> toy.helper -> toy.fast.kern" in m and "toy/helper.py:2 (lazy)" in m for m in reach
    ), reach
    assert any(m.startswith("toy/layers/dense.py:3 reaches toy.fast.kern directly") for m in reach), reach

    strict = [[e.importer for e in c] for c in find_cycles(modules, edges, include_lazy=False)]
    assert strict == [["toy.a", "toy.b"]], strict
    loose = [[e.importer for e in c] for c in find_cycles(modules, edges, include_lazy=True)]
    assert sorted(loose) == [["toy.a", "toy.b"], ["toy.c", "toy.d"]], loose
    # no false cycle between a package __init__ and its own submodules
    assert not any("toy.layers" in names for names in loose)

    eager = [e for e in edges if e.target == "toy.peer" and not e.lazy]
    assert [(e.importer, e.line) for e in eager] == [("toy.eager", 2)]
    assert any(e.target == "toy.peer" and e.lazy and e.line == 6 for e in edges)  # import_module("toy.peer")
    assert any(e.importer == "toy.peer" and e.target == "torch" for e in edges)


def test_the_reference_imports_nothing_from_io_but_the_tokenizer(graph):
    # io/ (files, checkpoints, data) sits above the reference: the reference gets arrays, not files.
    modules, edges = graph
    allowed = ("minilora.io.tokenizer",)
    found = forbidden_chains(modules, edges, REFERENCE, ("minilora.io.*",))
    crossings = sorted(
        f"{chain[-1].where(REPO)}: {chain[-1].importer} imports {chain[-1].target}"
        for _, chain in found
        if chain[-1].target not in allowed and not chain[-1].implied
    )
    assert not crossings, "reference modules import from minilora/io/:\n" + "\n".join(crossings)
