"""The package's import graph: imports point down the layers, never up, and never in a cycle.

Read from the source with `ast` (every `import`, also those inside functions, which a runtime check would miss), so a
shortcut such as "import it inside the function to dodge the cycle" fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "apertus_hf"

# Layer of each top-level module or subpackage, bottom first. A module may import its own layer's modules and lower
# ones; the two training jobs (pretraining, trainers) share a layer but must not import each other.
LAYERS = {
    "configuration_apertus": 0,
    "loss": 0,
    "training_facts": 0,
    "modeling_apertus": 1,
    "runtime": 2,
    "data": 2,
    "optim": 2,
    "tokenization": 2,
    "recipe_args": 2,
    "preference": 3,
    "evaluation": 4,
    "chat": 4,
    "pretraining": 5,
    "trainers": 5,
    "ablation": 6,
    "hub": 7,
}
SEPARATE_JOBS = {("pretraining", "trainers"), ("trainers", "pretraining")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The apertus_hf modules that the file at `path` imports, resolved to names in `modules`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            targets = [prefix, *(f"{prefix}.{alias.name}" for alias in node.names)]
        for target in targets:
            if target in modules:
                found.add(target)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}
    return {name: _imported_modules(path, set(files)) for name, path in files.items()}


def _layer_key(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_has_a_layer():
    unplaced = sorted({_layer_key(module) for module in _graph()} - set(LAYERS) - {None})
    assert not unplaced, f"Give these modules a layer in LAYERS: {unplaced}"


def test_imports_point_down_the_layers():
    upward = []
    for module, imports in _graph().items():
        source = _layer_key(module)
        if source is None:  # apertus_hf/__init__.py: the public API, which may gather from any layer
            continue
        for imported in imports:
            target = _layer_key(imported)
            if target is None or target == source:
                continue
            if LAYERS[target] > LAYERS[source] or (source, target) in SEPARATE_JOBS:
                upward.append(
                    f"{module} imports {imported} ({source}: layer {LAYERS[source]}, {target}: layer {LAYERS[target]})"
                )
    assert not upward, "Imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_the_training_loop_does_not_import_the_hub():
    for module, imports in _graph().items():
        if _layer_key(module) in ("pretraining", "trainers"):
            assert not [imported for imported in imports if _layer_key(imported) == "hub"], module


def test_no_import_cycles():
    graph = _graph()
    visiting, done, cycles = [], set(), []

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append(" -> ".join([*visiting[visiting.index(module) :], module]))
            return
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            # A package's __init__ importing its own submodules is how packages expose them, not a cycle.
            if not imported.startswith(f"{module}."):
                visit(imported)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not cycles, "Import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from .x import y\n", {"apertus_hf.pkg.x", "apertus_hf.pkg.x.y"}),
        ("def f():\n    from ..hub import publish\n", {"apertus_hf.hub", "apertus_hf.hub.publish"}),
        ("import apertus_hf.data\n", {"apertus_hf.data"}),
    ],
)
def test_the_walk_sees_relative_and_function_level_imports(tmp_path, monkeypatch, source, expected):
    package = tmp_path / "apertus_hf" / "pkg"
    package.mkdir(parents=True)
    module = package / "mod.py"
    module.write_text(source)
    monkeypatch.setattr("tests.test_import_graph.PACKAGE_ROOT", tmp_path / "apertus_hf")
    every_name = {
        "apertus_hf.pkg.x",
        "apertus_hf.pkg.x.y",
        "apertus_hf.hub",
        "apertus_hf.hub.publish",
        "apertus_hf.data",
    }
    assert _imported_modules(module, every_name) == expected
