"""The package layout is the architecture: dependencies point one way, protocol/ stays pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "execguard"

#: Which ExecGuard packages each package may import (DESIGN.md: downward only).
ALLOWED = {
    "protocol": set(),
    "verify": {"protocol"},
    "arbiter": {"protocol"},
    "ledger": {"protocol"},
    "gate": {"protocol", "verify"},
    "server": {"protocol", "arbiter", "ledger", "verify"},
}
#: protocol/ does no I/O: no files, network, processes, environment or logging set-up.
IMPURE_MODULES = {"os", "socket", "subprocess", "sqlite3", "httpx", "logging", "time", "pathlib",
                  "asyncio", "threading", "fastapi", "uvicorn", "psycopg", "cedarpy"}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependencies_point_one_way(package: str) -> None:
    for path in sorted((SRC / package).rglob("*.py")):
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] != "execguard" or len(parts) < 2:
                continue
            target = parts[1]
            if target != package:
                assert target in ALLOWED[package], f"{path.relative_to(SRC)} imports {name}"


def test_protocol_is_pure() -> None:
    for path in sorted((SRC / "protocol").rglob("*.py")):
        impure = {n.split(".")[0] for n in imports_of(path)} & IMPURE_MODULES
        assert not impure, f"{path.relative_to(SRC)} imports {impure}"
        assert "datetime.now" not in path.read_text(), path


def test_verify_needs_no_server_database_or_policy_engine() -> None:
    for path in sorted((SRC / "verify").rglob("*.py")):
        heavy = {n.split(".")[0] for n in imports_of(path)} & {
            "fastapi", "uvicorn", "sqlite3", "psycopg", "cedarpy", "httpx"}
        assert not heavy, f"{path.relative_to(SRC)} imports {heavy}"
