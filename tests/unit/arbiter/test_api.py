"""The arbiter's public names and its place in the layering."""

from __future__ import annotations

import ast
from pathlib import Path

import execguard.arbiter as arbiter

ARBITER_SRC = Path(arbiter.__file__).parent


def test_all_is_sorted_and_complete() -> None:
    assert arbiter.__all__ == sorted(arbiter.__all__)
    for name in arbiter.__all__:
        assert getattr(arbiter, name) is not None
    public = {name for name in vars(arbiter) if not name.startswith("_")}
    modules = {"bundle", "context", "digested", "engine", "facts", "locate", "projection",
               "registry", "testing"}
    assert public - modules == set(arbiter.__all__)


def test_arbiter_imports_only_protocol() -> None:
    for path in ARBITER_SRC.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.startswith("execguard."):
                    package = name.split(".")[1]
                    assert package in {"arbiter", "protocol"}, f"{path.name} imports {name}"
