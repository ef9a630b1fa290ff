"""The import graph of `jaxvit/` (read with `ast`, imports inside functions included) has no circles, and library
modules never import command-line modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import jaxvit

PACKAGE = Path(jaxvit.__file__).parent
# Modules with a command line (`python -m jaxvit.X`); everything else is library. A module or package named `cli`
# counts as one too.
CLI = {"jaxvit.main", "jaxvit.evaluate", "jaxvit.predict", "jaxvit.probe", "jaxvit.export", "jaxvit.robustness",
       "jaxvit.benchmark"}
# Task names and task-specific words the generic modules must not contain (the task's own behaviour is a Task member)
TASK_WORDS = ("ssl", "sar_grounding", "biomass", "cell_distance", "terramind", "classification")
GENERIC = ("export.py", "run_io.py", "predict.py", "robustness.py", "train.py")


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> jaxvit modules it imports. `from P import m` with m a module counts as an import of P.m (and of P
    only when some other name comes from P): a package's __init__ importing its own submodules is no circle."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                submodules = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files}
                found |= submodules
                if len(submodules) < len(node.names):
                    found.add(base)
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def is_cli(module: str) -> bool:
    return module in CLI or "cli" in module.split(".")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (a list of modules, the first repeated at the end), or None."""
    state, stack = {}, []  # state: 1 = on the current path, 2 = done

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_graph_sees_deferred_and_module_imports():
    graph = import_graph()
    assert "jaxvit.evals.knn" in graph["jaxvit.tasks.ssl.task"]  # `from jaxvit.evals import features, knn`, deferred
    assert "jaxvit.models.depth_weights" in graph["jaxvit.models.pretrained"]  # `from jaxvit.models import depth_weights`
    assert "jaxvit.cv" in graph["jaxvit.main"]  # imported inside main()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_library_modules_never_import_command_line_modules():
    bad = {m: sorted(filter(is_cli, deps)) for m, deps in import_graph().items() if not is_cli(m)}
    assert not {m: d for m, d in bad.items() if d}, "library modules importing command-line modules"


@pytest.mark.parametrize("name", GENERIC)
def test_generic_modules_name_no_task(name):
    text = (PACKAGE / name).read_text().lower()
    assert [w for w in TASK_WORDS if w in text] == [], f"{name} names a task: reach it through a Task member"
