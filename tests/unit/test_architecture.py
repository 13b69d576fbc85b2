"""The rooms of campaign/ (docs/architecture.md): imports point down, never in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "campaign"
MAX_LINES = 700

# Lower layers never import higher ones; a module imports only from layers below its own,
# except inside one package (the simulator's modules import each other, without a circle).
LAYERS: dict[str, int] = {
    # Pure pieces: no I/O, no other campaign module but these.
    "campaign.config": 0,
    "campaign.statuses": 0,
    "campaign.codes": 0,
    "campaign.sms": 0,
    "campaign.errors": 0,
    "campaign.metrics": 0,
    "campaign.logs": 0,
    "campaign.ratelimit": 0,
    "campaign.aio": 0,
    "campaign.netaddr": 0,
    "campaign.window": 0,
    "campaign.payload": 1,
    "campaign.reports": 1,
    # The receiver's connection guard (allow-list at accept, request read deadlines).
    "campaign.netguard": 1,
    # The only asyncpg user.
    "campaign.db": 1,
    # What the roles share: the producer -> sender contract and per-recipient preparation.
    "campaign.batch": 2,
    "campaign.prepare": 2,
    # Campaign figures for the dashboard and `campaign report`, and the page itself.
    "campaign.dashboard": 2,
    # Roles: none imports another.
    "campaign.producer": 3,
    "campaign.sender": 3,
    "campaign.recovery": 3,
    "campaign.reconciler": 3,
    "campaign.webhooks": 3,
    "campaign.fleet": 3,
    # The ops address of every process: probes, metrics, the dashboard.
    "campaign.ops": 3,
    "campaign.forwarder": 3,
    # Composition of the roles, and the API simulator (a tool beside them).
    "campaign.worker": 4,
    "campaign.simulator": 4,
    # Commands that are not roles, then the command line.
    "campaign.commands": 5,
    "campaign.cli": 6,
    "campaign.__main__": 7,
    # The package itself holds only __version__.
    "campaign": 0,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> int:
    """A module's layer: its own entry, else its package's (campaign.commands.status -> 5)."""
    name = module
    while name not in LAYERS:
        name, _, _ = name.rpartition(".")
        # A subpackage's modules take its layer; a new top-level module needs its own.
        assert name not in ("", "campaign"), (
            f"{module} has no layer: add it to LAYERS and docs/architecture.md"
        )
    return LAYERS[name]


def _package(module: str) -> str:
    return module.rpartition(".")[0] if module.count(".") > 1 else module


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "campaign"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "campaign":
                continue
            for alias in node.names:
                # `from campaign import db` and `from campaign.commands import status` name
                # modules; `from campaign.db import Pool` names the module it comes from.
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{module}: relative import; write campaign.x instead")
    found.discard(module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    for target in GRAPH[module]:
        if _package(target) == _package(module) and _package(module) != "campaign":
            continue  # inside one subpackage: checked for circles below
        assert _layer(target) < _layer(module), (
            f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        )


def test_no_import_circle() -> None:
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            circle = [*path[path.index(module) :], module]
            raise AssertionError("import circle: " + " -> ".join(circle))
        if module in done:
            return
        path.append(module)
        for target in sorted(GRAPH[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_the_sender_does_not_import_the_producer_and_nothing_imports_the_cli() -> None:
    assert "campaign.producer" not in GRAPH["campaign.sender"]
    assert {m for m, deps in GRAPH.items() if "campaign.cli" in deps} == {"campaign.__main__"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_under_700_lines(module: str) -> None:
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines < MAX_LINES, f"{module}: {lines} lines; split it along its concerns"
