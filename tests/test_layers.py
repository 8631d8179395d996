"""The import contract: the layers of DESIGN.md / docs/architecture.md hold, with no circles and no private names.

    kernels  <-  masks / geometry  <-  methods  <-  context / adapters  <-  API, CLI, pipelines, app, benchmarks

A module may import its own layer and the layers below it, never one above. Imports inside functions count too
(a lazy import is still an arrow). The whole package is parsed with `ast` (nothing is imported), so the test is
fast and fails on the first upward arrow, circle or private name, naming the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it is installed as (every folder lives under diffattn/)
FOLDERS = {"diffattn": "diffattn"}

# Layer of each module, by longest matching prefix (lower number = lower layer).
LAYERS: dict[str, int] = {
    "diffattn.kernels": 0,
    "diffattn.families": 1, "diffattn.geometry": 1, "diffattn.log": 1, "diffattn.masks": 1,
    "diffattn.layout": 1, "diffattn.frequency": 1,  # FICGen: layouts and soft occupancy; the FFT band split
    "diffattn.config": 2, "diffattn.call": 2, "diffattn.methods": 2, "diffattn.registry": 2,
    "diffattn.token_order": 2,  # what a method and the adapters share about running a forward in another order
    "diffattn.context": 3, "diffattn.adapters": 3, "diffattn.processors": 3, "diffattn.parallel": 3,
    "diffattn": 4,  # the package itself, api, cli, explorer, generate, demo, bench, pipelines, app
}
LAYER_NAMES = {0: "kernels", 1: "masks/geometry", 2: "methods", 3: "context/adapters", 4: "API/CLI/pipelines/app"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if node.level == 0:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path) -> list[tuple[str, int, list[str]]]:
    """(imported diffattn module, line, names imported from it) for every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name.split(".")[0] == "diffattn"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if target.split(".")[0] != "diffattn":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                out.append((sub, node.lineno, []) if sub in MODULES else (target, node.lineno, [alias.name]))
    return out


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _, _ in imports_of(module, path):
            if target in MODULES and target != module:
                graph[module].add(target)
    return graph


def test_every_module_has_a_layer():
    assert "diffattn.kernels.neighborhood.functional" in MODULES and "diffattn.app.server" in MODULES
    assert layer_of("diffattn.kernels.neighborhood.simulator") == 0
    assert layer_of("diffattn.masks.preview") == 1 and layer_of("diffattn.geometry") == 1
    assert layer_of("diffattn.methods.radial") == 2 and layer_of("diffattn.adapters.wan") == 3
    assert layer_of("diffattn.bench.step") == 4 and layer_of("diffattn.pipelines.freeswim") == 4


def test_no_upward_imports():
    wrong = []
    for module, path in MODULES.items():
        for target, line, _ in imports_of(module, path):
            if layer_of(target) > layer_of(module):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} ({LAYER_NAMES[layer_of(module)]}) imports "
                             f"{target} ({LAYER_NAMES[layer_of(target)]})")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_kernels_import_nothing_of_diffattn_above_them_nor_diffusers():
    wrong = []
    for module, path in MODULES.items():
        if layer_of(module) != 0:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] == "diffusers"]
    assert not wrong, wrong


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the circle it closes (`a -> b -> a`)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return circles


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_circles(graph) == [["a", "b", "c", "a"]]
    assert find_circles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circles():
    circles = find_circles(_edges())
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_no_private_names_across_modules():
    wrong = []
    for module, path in MODULES.items():
        for target, line, names in imports_of(module, path):
            if target == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {private} from {target}")
    assert not wrong, "private names imported across modules:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", ["diffattn.cli", "diffattn.app.tabs", "diffattn.app.runner"])
def test_tools_do_not_reach_into_the_registry(module):
    source = MODULES[module].read_text()
    assert "_REGISTRY" not in source, f"{module} reads registry._REGISTRY; use available_methods()/method_specs()"
