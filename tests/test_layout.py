"""The shape of the product code, checked: no import cycles, short functions, no test hooks.

The import graph counts every import statement that runs: at the top of a module and inside
functions alike (an import inside a function only hides a cycle until the function is called);
imports under `if TYPE_CHECKING:` never run and are left out. Importing kd_ray.a.b runs
kd_ray/a/__init__.py first, so it counts as an import of the package too.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "kd_ray")
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, str]:
    """Module name -> file, for every module of kd_ray."""
    out = {}
    for d, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(d, f)
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node that can run (not under `if TYPE_CHECKING:`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _with_parents(name: str, known: set[str]) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in found:
                targets |= _with_parents(target, known)
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "kd_ray.checks" in graph["kd_ray.cli"] and "kd_ray.spec" in graph["kd_ray.checks"]  # the graph sees imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_finds_one_hidden_in_a_function():
    """The checker itself: a cycle through a function-level import is found, and named."""
    tree = ast.parse("import os\ndef f():\n    from kd_ray import b\n")
    assert sorted(n.names[0].name for n in _imports(tree)) == ["b", "os"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def long_functions() -> list[str]:
    out = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{name}.{node.name} ({lines} lines)")
    return out


def test_no_function_longer_than_60_lines():
    assert long_functions() == []


@pytest.mark.parametrize("needle", ["KD_RAY_TEST_", "os._exit", "SIGKILL"])
def test_no_test_hooks_in_the_product(needle):
    """Tests inject faults through kd_ray.callbacks, as a user's own callbacks would run."""
    hits = [name for name, path in modules().items() if needle in open(path).read()]
    assert hits == [], f"{needle} in {hits}"


def _unit(module: str) -> str:
    """kd_ray.data.text -> data; kd_ray.cli -> cli: a package or top-level module of kd_ray."""
    return module.split(".")[1] if module.count(".") else module


def test_no_package_cycles():
    """Packages and top-level modules stack: no cycle among them, function-level imports counted
    (a lazy import hides a package cycle only until it runs)."""
    units: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        units.setdefault(_unit(name), set()).update(_unit(t) for t in targets if t.count("."))
    graph = {u: targets - {u} for u, targets in units.items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


# The function-level kd_ray imports that stay, each for a documented start-up cost: Ray Data's
# coordinators unpickle a teacher pool's plan and must not import torch (kd_ray.teacher), and
# kd_ray.tasks.build imports a task's module (torch, transformers) only when that task is built.
LAZY_ALLOWED = {
    ("kd_ray.teacher", "kd_ray.models"),
    ("kd_ray.tasks.build", "kd_ray.tasks.classify"),
    ("kd_ray.tasks.build", "kd_ray.tasks.causal_lm"),
}


def lazy_imports() -> set[tuple[str, str]]:
    """(module, kd_ray module it imports inside a function), outside the CLI."""
    out = set()
    for name, path in modules().items():
        if name in ("kd_ray.cli", "kd_ray.__main__"):
            continue
        for fn in ast.walk(ast.parse(open(path).read())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in _imports(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kd_ray"):
                        out.add((name, node.module))
                    elif isinstance(node, ast.Import):
                        out |= {(name, a.name) for a in node.names if a.name.startswith("kd_ray")}
    return out


def test_no_other_function_level_kd_ray_imports():
    assert lazy_imports() - LAZY_ALLOWED == set()


def test_both_tasks_implement_the_whole_protocol():
    """kd_ray.tasks.base.Task is the seam: every member it names, each task has, with the same
    parameters (a task's extra members are its own business, the shared code calls none)."""
    import inspect

    from kd_ray.tasks.base import Task
    from kd_ray.tasks.causal_lm import CausalLM
    from kd_ray.tasks.classify import Classify

    members = {n for n in dir(Task) if not n.startswith("_")} | set(Task.__annotations__)
    assert {"check", "micro_step", "teacher_tensors", "SCORES", "handle", "export"} <= members
    for cls in (Classify, CausalLM):
        missing = sorted(n for n in members if not hasattr(cls, n) and n not in ("spec",))
        assert missing == [], f"{cls.__name__} lacks {missing}"
        for name in members:
            protocol, own = getattr(Task, name, None), getattr(cls, name, None)
            if inspect.isfunction(protocol):
                assert list(inspect.signature(own).parameters) == list(inspect.signature(protocol).parameters), (cls.__name__, name)
