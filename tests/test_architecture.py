"""The import rules of docs/architecture.md, read from the source: no cycles, layers one way."""

import ast
import importlib
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

PACKAGE = Path(__file__).resolve().parent.parent / "pushagent"
# Lowest first; a module may import its own folder and lower layers only.
LAYERS = [{"errors", "redact", "config", "__init__"}, {"inputs", "documents"}, {"cluster", "state"}, {"ops"},
          {"runs"}, {"cli", "__main__"}]
READ_SIDE = {"pushagent.cluster.client", "pushagent.cluster.scan"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set:
    """Every module `path` imports, lazy imports in functions included; `from pkg import mod` names the module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path.name}: pushagent imports itself by absolute names"
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & MODULES
            found.update(submodules or {node.module})
    return found


MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}
GRAPH = {module_name(path): {name for name in imports_of(path) if name in MODULES} for path in PACKAGE.rglob("*.py")}
EXTERNAL = {module_name(path): {name.split(".")[0] for name in imports_of(path)} for path in PACKAGE.rglob("*.py")}


def area(module: str) -> str:
    """The folder (or top-level module) a module belongs to."""
    return module.split(".")[1] if "." in module else "__init__"


def layer(module: str) -> int:
    return next(index for index, names in enumerate(LAYERS) if area(module) in names)


def test_every_module_has_a_layer():
    assert all(any(area(module) in names for names in LAYERS) for module in MODULES), sorted(MODULES)


def test_no_import_cycles():
    done, path, cycles = set(), [], []

    def visit(module):
        if module in path:
            cycles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        path.append(module)
        for target in sorted(GRAPH[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_layers_point_one_way():
    upward = [f"{module} imports {target}" for module, targets in GRAPH.items() for target in targets
              if area(target) != area(module) and target != "pushagent" and layer(target) > layer(module)]
    assert not upward, "\n".join(sorted(upward))


def test_only_the_cli_knows_click_and_only_the_entry_point_imports_the_cli():
    assert {module for module, names in EXTERNAL.items() if "click" in names} == {"pushagent.cli"}
    assert {module for module, targets in GRAPH.items() if "pushagent.cli" in targets} == {"pushagent.__main__"}


def test_inputs_and_documents_know_no_http():
    """Not the cluster's HTTP client nor anything of cluster/ (S3 goes through boto3, its own client)."""
    offenders = [module for module in MODULES if area(module) in ("inputs", "documents")
                 and ("requests" in EXTERNAL[module]
                      or any(area(target) == "cluster" for target in GRAPH[module]))]
    assert not offenders


def test_the_state_and_its_queue_never_send():
    assert not [module for module in MODULES if area(module) == "state"
                and ({"requests"} & EXTERNAL[module] or any(area(target) == "cluster" for target in GRAPH[module]))]


def test_the_read_side_does_not_import_the_bulk_sender():
    assert not [module for module in READ_SIDE if "pushagent.cluster.bulk" in GRAPH[module]]


@pytest.mark.parametrize("module", sorted(MODULES - {"pushagent.__main__"}))
def test_each_module_imports_alone(module):
    """A cycle hidden by import order shows up when the module is the first one imported."""
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "pushagent"}
    try:
        importlib.import_module(module)
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "pushagent"]:
            del sys.modules[name]
        sys.modules.update(saved)
