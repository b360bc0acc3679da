"""The package layout holds: imports run one way, from the faces down to the model and the
wire, with no cycle anywhere (not through `TYPE_CHECKING`, not through an import inside a
function), and nothing outside the engine asks for a concrete stage class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cake

ROOT = Path(cake.__file__).resolve().parent

# Lower layers never import higher ones; modules of one layer may import each other (the
# module graph must still be acyclic). The five files of the design card sit where they fit.
LAYERS = {
    "cake.errors": 0,
    "cake.topology": 1,
    "cake.host": 2,
    "cake.model": 3,
    "cake.wire": 3,
    "cake.engine": 4,
    "cake.split": 4,
    "cake.decoding": 5,
    "cake.worker": 5,
    "cake.cluster": 6,
    "cake.master": 7,
    "cake.faces": 8,
    "cake.cli": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Every cake module `path` imports, anywhere in the file (top level, functions,
    `if TYPE_CHECKING:` blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from cake.host import devices` imports the module cake.host.devices
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    return found


GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def layer(module: str) -> int:
    for prefix, rank in sorted(LAYERS.items(), key=lambda item: -len(item[0])):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        if module != "cake":
            layer(module)


def test_no_import_cycle() -> None:
    """Depth-first search over the import graph; a back edge is a cycle, printed whole."""
    state: dict[str, str] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = [*stack[stack.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "cake"))
def test_imports_go_down(module: str) -> None:
    upward = [
        target for target in GRAPH[module] if target != "cake" and layer(target) > layer(module)
    ]
    assert not upward, f"{module} (layer {layer(module)}) imports higher layers: {upward}"


def test_only_the_engine_knows_concrete_stages() -> None:
    """The Stage protocol says what callers need (remote or not, health, retire)."""
    for module, path in MODULES.items():
        if module.startswith("cake.engine"):
            continue
        text = path.read_text(encoding="utf-8")
        for concrete in ("RemoteStage", "LocalStage"):
            assert concrete not in text, f"{module} names {concrete}"


def test_the_graph_is_real() -> None:
    """The checks above look at something: the master reaches the model through the engine."""
    assert "cake.engine.pipeline" in GRAPH["cake.master"]
    assert "cake.model.opener" in GRAPH["cake.worker"]
    assert layer("cake.faces.api.routes") > layer("cake.master") > layer("cake.engine.session")
