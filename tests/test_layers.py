"""The package's import graph: every module imports only modules of its own layer or below (docs/architecture.md,
"Layers"), and no two modules import each other through any chain (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fluxgate"

# Top to bottom; a module may import its own layer and the ones below it. Names are module paths under fluxgate
# (a package stands for every module in it).
LAYERS = [
    {"plugin", "cli", "ab", "ab_combo", "ab_sides", "ab_worker", "merge", "scan", "publish", "card", "thresholds",
     "dashboard", "sources"},
    {"session", "settings", "workers", "options", "progress", "probing"},
    {"gate"},
    {"showing"},
    {"judging"},
    {"measuring"},
    {"weights"},
    {"models", "precisions", "matrix", "inputs"},
    {"storing"},
    {"stats", "registry", "hookspec", "hooks", "errors", "files", "environ", "defaults", "__init__"},
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports(path: Path) -> set[str]:
    """fluxgate modules `path` imports, anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fluxgate"):
            base = node.module.removeprefix("fluxgate").lstrip(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}".lstrip(".")
                found.add(candidate if _exists(candidate) else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("fluxgate.") for a in node.names if a.name.startswith("fluxgate.")}
    return {name for name in found if name}


def _exists(module: str) -> bool:
    path = PACKAGE.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(index for index, names in enumerate(LAYERS) if top in names or module in names)


def _graph() -> dict[str, set[str]]:
    return {_module(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_is_in_a_layer():
    unplaced = [module for module in _graph() if not any(module.split(".")[0] in names for names in LAYERS)]
    assert not unplaced


def test_no_module_imports_one_of_a_higher_layer():
    upward = sorted(f"{module} -> {target}" for module, targets in _graph().items() for target in targets
                    if _layer(target) < _layer(module))
    assert not upward


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, chain: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == module or target not in graph:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join(chain[chain.index(target):] + [target]))
            elif target not in state:
                visit(target, chain + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles


def test_the_rules_import_no_measuring_and_no_orchestration():
    # judging holds rules (statistics, limits, verdicts): it reads records, never runs or times a model
    found = sorted(f"{module} -> {target}" for module, targets in _graph().items() if module.startswith("judging")
                   for target in targets if target.split(".")[0] in ("measuring", "weights", "gate", "session"))
    assert not found
