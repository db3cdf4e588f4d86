"""The part of a request's context that a bundle's policies can read.

Cedar converts every attribute of the context it is given into its own values
before it evaluates anything, and that conversion was most of an evaluation's
native cost (the computed facts alone about a third), though the policies of a
surface read a few attributes. The policies' JSON form shows every place a
policy touches the context: an attribute access (``context.a.b``,
``context["a"]``) or a ``has`` test, each naming a path. Only those paths are
passed; a record that a policy uses in any other way (``context == {...}``,
``context.facts`` as a value) is passed whole.

Leaving out an attribute that no policy names changes no decision: Cedar only
reads attributes by name, so an attribute it is not given is one it would not
have read. The paths are collected per action from the policies whose scope is
``action == Action::"<surface>"``, plus every policy with a wider scope.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ContextProjection", "Projection", "project", "projection_of", "scoped_action"]

#: The attributes to keep, each with what to keep of its value: ``None`` keeps a
#: value whole; a projection of ``None`` keeps the whole context.
Projection = Mapping[str, "Projection | None"] | None


def _context_path(node: Any) -> tuple[str, ...] | None:
    """The attribute path of ``context.a.b...``, or None if ``node`` is something else."""
    path: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        if node.get("Var") == "context":
            return tuple(reversed(path))
        access = node.get(".")
        if not isinstance(access, dict) or not isinstance(access.get("attr"), str):
            return None
        path.append(access["attr"])
        node = access.get("left")
    return None


def _paths(node: Any, found: list[tuple[str, ...]]) -> None:
    """Collect the context paths an expression in Cedar's JSON form reads (``()``: all)."""
    if isinstance(node, list):
        for item in node:
            _paths(item, found)
        return
    if not isinstance(node, dict):
        return
    if len(node) == 1:
        ((operator, operand),) = node.items()
        if operator == "Value":
            return  # a literal: data, not an expression
        if operator == "Var":
            if operand == "context":
                found.append(())  # the context used as a value: all of it
            return
        if operator in (".", "has") and isinstance(operand, dict) \
                and isinstance(operand.get("attr"), str):
            base = _context_path(operand.get("left"))
            if base is not None:
                found.append((*base, operand["attr"]))
                return
    for value in node.values():
        _paths(value, found)


def _merge(paths: Iterable[tuple[str, ...]]) -> Projection:
    tree: dict[str, Any] = {}
    for path in sorted(paths, key=len):
        if not path:
            return None
        node = tree
        for depth, name in enumerate(path):
            if name in node and node[name] is None:
                break  # an enclosing record is already kept whole
            if depth == len(path) - 1:
                node[name] = None
            else:
                node = node.setdefault(name, {})
    return tree


def scoped_action(policy: Mapping[str, Any]) -> str | None:
    """The one action a policy is scoped to, or None when it may apply to several."""
    scope = policy.get("action")
    if isinstance(scope, dict) and scope.get("op") == "==":
        entity = scope.get("entity")
        if isinstance(entity, dict) and entity.get("type") == "Action" \
                and isinstance(entity.get("id"), str):
            return entity["id"]
    return None


class ContextProjection:
    """What of the context each action's policies read, from the policies' JSON form."""

    def __init__(self, static_policies: Mapping[str, Mapping[str, Any]]) -> None:
        everywhere: list[tuple[str, ...]] = []
        per_action: dict[str, list[tuple[str, ...]]] = {}
        for policy in static_policies.values():
            found: list[tuple[str, ...]] = []
            _paths(policy.get("conditions", []), found)
            action = scoped_action(policy)
            if action is None:
                everywhere += found
            else:
                per_action.setdefault(action, []).extend(found)
        self._default = _merge(everywhere)
        self._by_action = {action: _merge([*everywhere, *paths])
                           for action, paths in per_action.items()}

    def for_action(self, action: str) -> Projection:
        """The projection for requests on ``action`` (a surface name)."""
        return self._by_action.get(action, self._default)


def _is_record(value: Any) -> bool:
    # Cedar's JSON escapes ({"__extn": ...}, {"__entity": ...}) are values, not records.
    return type(value) is dict and "__extn" not in value and "__entity" not in value


def project(context: Mapping[str, Any], projection: Projection) -> Mapping[str, Any]:
    """``context`` with only the attributes ``projection`` keeps."""
    if projection is None:
        return context
    kept: dict[str, Any] = {}
    for name, inner in projection.items():
        if name in context:
            value = context[name]
            kept[name] = value if inner is None or not _is_record(value) \
                else project(value, inner)
    return kept


def projection_of(policy_json: Mapping[str, Any]) -> ContextProjection:
    """The projection of a policy set in Cedar's JSON form (``policies_to_json_str``)."""
    return ContextProjection(policy_json.get("staticPolicies", {}))
