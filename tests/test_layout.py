"""The package's layers: every import goes down the stack of docs/design.md ("Layers"), and no module imports a layer above it."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cmt_openmm"

# Lowest first: a module may import its own layer and the layers before it.
LAYERS = ["errors", "files", "units", "importance", "target", "systems", "energy", "coordinates", "flows",
          "generator", "training", "sampling", "export", "analysis", "runs", "cli"]


def _layer(module: str) -> str:
    """'cmt_openmm.sampling.moves' -> 'sampling'."""
    return module.split(".")[1]


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute names of the package modules imported by ``path`` (at any depth), with line numbers."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if not module.startswith("cmt_openmm"):
                continue
            if module == "cmt_openmm":  # `from .. import x`: x is a layer, or the root's own (__version__)
                found += [(f"cmt_openmm.{alias.name}", node.lineno) for alias in node.names
                          if not alias.name.startswith("__")]
            else:
                found.append((module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("cmt_openmm.")]
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
                 or p.parent != PACKAGE)


def test_every_module_belongs_to_a_layer():
    layers = {_layer("cmt_openmm." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in MODULES}
    assert layers <= set(LAYERS), f"modules outside the layer list: {sorted(layers - set(LAYERS))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    own = LAYERS.index(_layer("cmt_openmm." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)))
    upward = [(module, line) for module, line in _imports(path) if LAYERS.index(_layer(module)) > own]
    assert not upward, f"{path.name} imports layers above its own: {upward}"


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these modules by idea: {long}"
