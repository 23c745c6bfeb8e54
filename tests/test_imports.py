"""The structure drawn from the imports of ``flip``: no import circle, and every import runs
down the layers (a library module never imports the runner or the CLI; data never imports
evaluation; models never import data).

The graph is read with ``ast`` from the package's source (every ``import flip…`` and ``from
flip… import …``, at module level or inside functions), so it holds without importing
anything."""

import ast
from pathlib import Path

import pytest

import flip

PACKAGE = Path(flip.__file__).parent

# Each unit of the package (a top-level module or a sub-package) on its layer; a module may
# import its own unit and the units of lower layers only.
LAYERS = {
    0: {"errors", "schedule", "masking", "loss", "tokenizer", "metrics", "console", "assets"},
    1: {"models", "config", "checkpoint"},
    2: {"objective", "reconstruction", "data", "resume"},  # resume: checkpoint files of a run
    3: {"grad_cache", "eval"},
    4: {"tasks", "interop", "callbacks", "train"},  # train: pre-training's part of a run
    5: {"run"},  # the runner: prepare, build, fit or test, record
    6: {"cli"},  # the commands: configs read, bad input printed as one line
}
LAYER = {unit: layer for layer, units in LAYERS.items() for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """flip module -> the flip modules it imports (``from flip.x import name`` counts as
    ``flip.x.name`` when that is a module, else ``flip.x``)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("flip"))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.startswith("flip"):
                    for a in node.names:
                        sub = f"{node.module}.{a.name}"
                        targets.add(sub if sub in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def unit(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read_from_the_package():
    graph = import_graph()
    # a few edges known from the source: the reading finds real imports
    assert "flip.data.benchmarks.readers" in graph["flip.data.coco_captions"]
    assert "flip.errors" in graph["flip.config"]
    assert "flip.tasks.transfer" in graph["flip.tasks.vqa"]
    # and the cycle finder finds a planted circle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_every_unit_has_a_layer():
    units = {unit(m) for m in import_graph()} - {""}
    assert units <= set(LAYER), f"give these a layer in LAYERS: {sorted(units - set(LAYER))}"


@pytest.mark.parametrize("name", sorted(LAYER))
def test_imports_run_down_the_layers(name):
    graph = import_graph()
    upward = [
        f"{m} -> {t}"
        for m, targets in graph.items()
        if unit(m) == name
        for t in targets
        if unit(t) != name and LAYER.get(unit(t), -1) >= LAYER[name]
    ]
    assert not upward, "imports running up or sideways: " + "; ".join(upward)
