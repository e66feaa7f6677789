"""The layering rules of docs/architecture.md, checked on the source: no import circle among
dbprofile's modules (imports inside functions and under TYPE_CHECKING count too), no module
over the size limit, no import of another module's private names, and the layers import only
downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dbprofile"
MAX_MODULE_LINES = 450

# A module may import from its own layer and the layers below it (docs/architecture.md).
LAYERS = [
    (
        "leaves",
        {
            "spec",
            "vocabulary",
            "units",
            "files",
            "schema",
            "version",
            "seeding",
            "edm",
            "masked_diffusion",
            "techniques",
            "sequence_layout",
            "torch_internals",
            "progress",
            "settings",
            "spread",
        },
    ),
    ("data", {"results", "verdict"}),
    ("models", {"models"}),
    ("methods", {"methods"}),
    ("measure", {"measure", "loading", "gpus"}),
    ("planning", {"planner", "validate"}),
    ("presentation", {"report", "console"}),
    ("front", {"cli", "__init__", "__main__"}),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every dbprofile module ``module`` imports, wherever the import statement is."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
        else:
            continue
        found.update(t for n in names if n.startswith("dbprofile") and (t := _resolve(n)) and t != module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for index, (_, names) in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} belongs to no layer of docs/architecture.md; add it to LAYERS and the doc")


def test_no_import_circle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert circles == []


def test_the_checker_sees_a_circle_and_imports_inside_functions():
    # The import graph must see what the rules are about, or the test above proves nothing.
    assert "dbprofile.measure.fake" in GRAPH["dbprofile.loading"]
    assert "dbprofile.sequence_layout" in GRAPH["dbprofile.models.hf_positions"]  # TYPE_CHECKING
    assert "dbprofile.models.hf" in GRAPH["dbprofile.loading"]  # inside a function
    assert "dbprofile.results.views" in GRAPH["dbprofile.results.plan"]  # from a package import a module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines; split it by job (docs/architecture.md)"


def test_layers_import_only_downwards():
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in GRAPH.items()
        for b in targets
        if _layer(b) > _layer(a) and not (a == "dbprofile" or a.startswith("dbprofile.cli"))
    )
    assert upward == []


def test_no_module_imports_another_modules_private_names():
    private = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dbprofile"):
                private += [
                    f"{module}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.endswith("__")
                ]
    assert private == []
