"""Each package's __all__ names exactly what it exposes (ruff's RUF022 keeps it sorted)."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ["execguard", "execguard.protocol", "execguard.arbiter", "execguard.ledger",
            "execguard.verify"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_complete(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported)
    for item in exported:
        assert hasattr(module, item), f"{name}.{item} is listed in __all__ but missing"
    public = {n for n, v in vars(module).items()
              if not n.startswith("_") and getattr(v, "__module__", "").startswith(name + ".")}
    assert public <= set(exported), f"{name} exposes {public - set(exported)} without __all__"
