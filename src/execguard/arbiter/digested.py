"""Evaluating a stored request again, when its sensitive fields are only digests.

A decision stores its request normalized, each sensitive context field as the
digest of its value, never the value (PROTOCOL.md §2). Evaluated again (a
replay, an approval's resolution), such a request cannot be decided exactly
under a policy that reads one of those fields. Otherwise the field can still
decide a SILENCE through its declaration, so it gets a stand-in keeping what the
decision showed: absent if null, invalid if the decision named it invalid, else
a valid value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import cedarpy

from execguard.arbiter.bundle import PolicyBundle
from execguard.arbiter.registry import FieldSpec, SurfaceSpec
from execguard.protocol.request import digest_value

__all__ = ["context_reads", "looks_digested", "stored_context"]

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_NULL_DIGEST = digest_value(None)
_INVALID = {"redacted": "stand-in for a sensitive value the decision found invalid"}


def stored_context(bundle: PolicyBundle, spec: SurfaceSpec, recorded_spec: SurfaceSpec | None,
                   stored: Mapping[str, Any], invalid: str = "") -> dict[str, Any] | str:
    """The stored context with stand-ins for digested sensitive fields, or why it cannot be.

    ``spec`` is the surface under ``bundle``, the policy it is evaluated under now;
    ``recorded_spec`` the surface as the decision saw it (None: the same); ``invalid``
    the reason of the decision's ``INVALID_CONTEXT``, if it was one.
    """
    context = dict(stored)
    # The fields stored as digests are those sensitive when the decision was taken.
    sensitive = spec.sensitive | (recorded_spec.sensitive if recorded_spec else frozenset())
    digested = sorted(name for name in sensitive if looks_digested(stored.get(name)))
    if not digested:
        return context
    reads = context_reads(bundle, spec.name)
    for name in digested:
        readers = reads.get(name, ()) + reads.get("*", ())
        if readers:
            return (f"policy {readers[0]!r} reads context.{name}, which is sensitive and "
                    "stored only as a digest, so it cannot be evaluated again exactly")
        # A sum reserves the value itself: a stand-in would reserve the wrong amount.
        # (Only across versions: a bundle cannot sum a field it declares sensitive.)
        summing = sorted(fact.name for fact in spec.facts.values() if fact.field == name)
        if summing:
            return (f"fact {summing[0]!r} sums context.{name}, which was sensitive and is "
                    "stored only as a digest, so its amount cannot be reserved")
        declared = spec.context.get(name)
        if declared is None:
            continue  # undeclared fields never reach the policies
        before = recorded_spec.context.get(name) if recorded_spec is not None else declared
        if before != declared:
            return (f"this policy version declares the sensitive field context.{name} "
                    "differently, and its recorded value is only a digest")
        if stored[name] == _NULL_DIGEST:
            context[name] = None
        elif invalid.startswith(f"context.{name} "):
            context[name] = _INVALID
        else:
            context[name] = _stand_in(declared, stored[name])
    return context


def looks_digested(value: Any) -> bool:
    """Whether a stored context value has the shape of a sensitive value's digest."""
    return isinstance(value, str) and _DIGEST_RE.match(value) is not None


def _stand_in(spec: FieldSpec, digest: str) -> Any:
    """A value its declaration accepts: what the recorded decision says the field held."""
    if spec.type == "boolean":
        return True
    if spec.type in ("integer", "decimal"):  # 0, moved into [min, max]
        low = spec.minimum if spec.minimum is not None else 0
        value = min(low, spec.maximum) if spec.maximum is not None else low
        return int(value) if value == int(value) else float(value)
    if spec.type == "string":
        return spec.enum[0] if spec.enum else digest[: spec.max_length or None]
    return []  # string_set


@lru_cache(maxsize=64)
def context_reads(bundle: PolicyBundle, surface: str) -> Mapping[str, tuple[str, ...]]:
    """Context field -> the @ids of the policies for ``surface`` that read its value
    (``*``: policies that use the context record as a whole)."""
    reads: dict[str, tuple[str, ...]] = {}
    for policy in json.loads(cedarpy.policies_to_json_str(bundle.policy_text))[
            "staticPolicies"].values():
        scope = policy.get("action", {})
        named = [scope["entity"]] if "entity" in scope else scope.get("entities", [])
        if scope.get("op") in ("==", "in") and surface not in {e["id"] for e in named}:
            continue
        fields: set[str] = set()
        _walk(policy.get("conditions", []), fields)
        for name in fields:
            reads[name] = (*reads.get(name, ()), policy["annotations"]["id"])
    return MappingProxyType(reads)


def _walk(node: Any, fields: set[str]) -> None:
    """Collect the context fields a Cedar JSON expression reads."""
    if isinstance(node, list):
        for item in node:
            _walk(item, fields)
    elif node == {"Var": "context"}:
        fields.add("*")  # the record as a whole (compared, passed on): every field counts
    elif isinstance(node, dict):
        for op, operand in node.items():
            if op in (".", "has") and isinstance(operand, dict) \
                    and operand.get("left") == {"Var": "context"}:
                if op == ".":  # ``has`` only tests presence, which the stand-ins keep
                    fields.add(str(operand.get("attr")))
            else:
                _walk(operand, fields)
