"""The package's layers, checked from the code's own imports (every ``import``, also inside functions).

Each module may import only modules of its own layer or of layers below it (docs/design.md):

    math < verl adapters < patches < plugin < extras (cpu, demo, paper) < commands

and the imports at module level form no circle. The graph is read with ``ast`` from the source files, so
an import that only runs on some path counts as much as one that always runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"cw_verl": ROOT / "cw_verl", "cw_verl.patches": ROOT / "patches"}

LAYERS = ("math", "verl adapters", "patches", "plugin", "extras", "commands")
LAYER_OF_MODULE = {
    # math: torch only
    "cw_verl": "math",
    "cw_verl.weights": "math",
    "cw_verl.selection": "math",
    "cw_verl.authors_objective": "math",
    "cw_verl.ep": "math",
    # verl adapters: the math on verl's calling conventions and composed config
    "cw_verl.context": "verl adapters",
    "cw_verl.distributed": "verl adapters",
    "cw_verl.verl_config": "verl adapters",
    "cw_verl.verl_losses": "verl adapters",
    "cw_verl.cov_losses": "verl adapters",
    "cw_verl.authors_loss": "verl adapters",
    "cw_verl.verl_ep": "verl adapters",
    "cw_verl.ep_config": "verl adapters",
    "cw_verl.whole_groups": "verl adapters",
    "cw_verl.registry": "verl adapters",
    "cw_verl.config_rules": "verl adapters",
    "cw_verl.packages": "verl adapters",
    "cw_verl.patches": "patches",
    "cw_verl.verl_plugin": "plugin",
    "cw_verl.preflight": "plugin",
    "cw_verl.cpu": "extras",
    "cw_verl.demo": "extras",
    "cw_verl.paper": "extras",
    "cw_verl.__main__": "commands",
}
CORE_LAYERS = ("math", "verl adapters", "patches", "plugin")


def module_files() -> dict[str, Path]:
    files = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in directory.rglob("*.py"):
            relative = path.relative_to(directory).with_suffix("")
            parts = [part for part in relative.parts if part != "__init__"]
            name = ".".join([package, *parts])
            if package == "cw_verl" and parts[:1] == ["patches"]:
                continue
            files[name] = path
    return files


def layer_of(module: str) -> str:
    candidates = [prefix for prefix in LAYER_OF_MODULE if module == prefix or module.startswith(prefix + ".")]
    if not candidates:
        raise KeyError(f"{module} is in no layer: add it to LAYER_OF_MODULE (and to docs/design.md)")
    return LAYER_OF_MODULE[max(candidates, key=len)]


def imports_of(name: str, path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported cw_verl module, line, at module level)`` for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import module` imports the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "cw_verl" or target.startswith("cw_verl."):
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                found.append((target, node.lineno, id(node) in top_level))
    return found


@pytest.fixture(scope="module")
def graph():
    files = module_files()
    modules = set(files)
    return {name: imports_of(name, path, modules) for name, path in files.items()}


def test_every_module_is_in_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_no_import_runs_upward(graph):
    upward = []
    for module, imports in graph.items():
        own = LAYERS.index(layer_of(module))
        for target, line, _ in imports:
            if LAYERS.index(layer_of(target)) > own:
                upward.append(f"{module}:{line} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not upward, "\n".join(upward)


def test_the_core_never_imports_the_extras(graph):
    for module, imports in graph.items():
        if layer_of(module) in CORE_LAYERS:
            for target, line, _ in imports:
                assert not target.startswith(("cw_verl.cpu", "cw_verl.demo", "cw_verl.paper")), f"{module}:{line}"


def test_module_level_imports_form_no_circle(graph):
    edges = {module: {t for t, _, top in imports if top and t != module} for module, imports in graph.items()}
    # A package's __init__ importing its own submodules is how a package exposes them, not a circle.
    done, path = set(), []

    def visit(module):
        if module in path:
            circle = path[path.index(module) :] + [module]
            if not all(m == circle[0] or m.startswith(circle[0] + ".") for m in circle):
                raise AssertionError("import circle: " + " -> ".join(circle))
            return
        if module in done:
            return
        path.append(module)
        for target in sorted(edges.get(module, ())):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(edges):
        visit(module)


def test_the_checker_sees_an_upward_import(tmp_path):
    """Negative control: the reader finds a function-level import of an upper layer in a math module."""
    source = tmp_path / "weights.py"
    source.write_text("def f():\n    from cw_verl.demo import cli\n")
    found = imports_of("cw_verl.weights", source, {"cw_verl.weights", "cw_verl.demo", "cw_verl.demo.cli"})
    assert found == [("cw_verl.demo.cli", 2, False)]
    assert LAYERS.index(layer_of("cw_verl.demo.cli")) > LAYERS.index(layer_of("cw_verl.weights"))
