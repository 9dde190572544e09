"""The layering of ARCHITECTURE.md, checked on the import statements of the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "splitserve"
PROCESS_LAYERS = ("splitserve.worker", "splitserve.daemons", "splitserve.router",
                  "splitserve.planner")


def imports_of(folder: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((SRC / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(SRC))] = names
    return found


@pytest.mark.parametrize("folder,forbidden", [
    ("control", PROCESS_LAYERS),
    ("engine", ("nats", "grpc", "nixl", "nixl_cu12", "splitserve.queue",
                "splitserve.transfer", "splitserve.control", *PROCESS_LAYERS)),
    ("routing", ("nats", "grpc", "nixl_cu12", "splitserve.queue", "splitserve.transfer",
                 *PROCESS_LAYERS)),
    # the router forwards requests: no engine to run, no KV to move, no worker inside
    ("router", ("torch", "nixl", "nixl_cu12", "splitserve.transfer", "splitserve.worker",
                "splitserve.daemons", "splitserve.planner", "splitserve.engine.llm_engine")),
])
def test_layer_imports_point_one_way(folder: str, forbidden: tuple[str, ...]) -> None:
    bad = {path: sorted(n for n in names if n.split(".")[0] in forbidden
                        or any(n == f or n.startswith(f + ".") for f in forbidden))
           for path, names in imports_of(folder).items()}
    assert {path: names for path, names in bad.items() if names} == {}


ENGINE_STATE = frozenset({"scheduler", "allocator", "remote", "runner"})


def test_no_module_outside_the_engine_reads_its_state() -> None:
    """The engine is single-threaded: outside `engine/`, nothing reads its scheduler,
    page allocator, remote prefills or runner (they change under a running step), nor
    reaches through `AsyncEngine.engine`. Readers use `AsyncEngine.stats` / `.info`, or
    a call run on the engine thread through an `Engine` method."""
    found: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        if path.is_relative_to(SRC / "engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            # `x.engine.<state>` / `x.engine.engine`, or `.scheduler` / `.allocator` anywhere
            through = isinstance(node.value, ast.Attribute) and node.value.attr == "engine"
            if (through and node.attr in ENGINE_STATE | {"engine"}
                    or node.attr in ("scheduler", "allocator")):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}")
    assert found == [], found
