"""Fixtures for the arbiter tests: the demo bundle, fixed facts and small bundles on disk."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from execguard.arbiter import CompiledBundle, PolicyBundle, compute_facts, demo_bundle_path

#: The demo's stateful payment facts for an actor with no other payments today.
NO_HISTORY = {"amount_sum_24h": Decimal("0"), "payments_1h": 1}
#: Thursday 2026-11-26, 22:30 UTC: the clock's facts alone, and with the stateful ones.
THURSDAY_CLOCK = compute_facts(datetime(2026, 11, 26, 22, 30, tzinfo=UTC))
THURSDAY = {**THURSDAY_CLOCK, **NO_HISTORY}
#: Saturday 2026-11-28, 10:00 UTC.
SATURDAY = {**compute_facts(datetime(2026, 11, 28, 10, 0, tzinfo=UTC)), **NO_HISTORY}

SMALL_SCHEMA = "entity Actor;\nentity Subject;\n"
SMALL_SURFACES = """\
[surfaces."job.run"]
risk = "low"

[surfaces."job.run".context]
n = { type = "integer", required = true }

[surfaces."job.run".signals]
x = { type = "integer" }
"""


def demo_files() -> dict[str, bytes]:
    """The demo bundle's files, as ``PolicyBundle.from_files`` takes them."""
    root = demo_bundle_path()
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.parts)
    }


@pytest.fixture(scope="session")
def demo_bundle() -> PolicyBundle:
    return PolicyBundle.from_directory(demo_bundle_path())


@pytest.fixture(scope="session")
def demo_engine(demo_bundle: PolicyBundle) -> CompiledBundle:
    return CompiledBundle(demo_bundle)


def write_bundle(
    root: Path,
    policies: Mapping[str, str],
    surfaces: str = SMALL_SURFACES,
    schema: str = SMALL_SCHEMA,
) -> Path:
    """Write a bundle directory: ``policies`` maps file names under policies/ to text."""
    (root / "policies").mkdir(parents=True)
    (root / "schema.cedarschema").write_text(schema)
    (root / "surfaces.toml").write_text(surfaces)
    for name, text in policies.items():
        (root / "policies" / name).write_text(text)
    return root


@pytest.fixture
def small_engine(tmp_path: Path) -> Callable[..., CompiledBundle]:
    """Build an engine from a small bundle written into the test's tmp_path."""
    counter = iter(range(1000))

    def build(policies: Mapping[str, str], **kwargs: Any) -> CompiledBundle:
        root = write_bundle(tmp_path / f"bundle{next(counter)}", policies, **kwargs)
        return CompiledBundle(PolicyBundle.from_directory(root))

    return build
