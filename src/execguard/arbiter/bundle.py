"""Policy bundles: loading, validating and versioning a directory of policy.

A bundle is a directory (or a mapping of relative paths to bytes) holding::

    policies/*.cedar       one or more Cedar policy files; every policy has a unique @id
    schema.cedarschema     Cedar schema text: entity types (at least Actor and Subject)
                           and common types, but no actions
    surfaces.toml          the surface registry (see execguard.arbiter.registry)
    README.md              optional; part of the content, otherwise ignored
    tests/*.toml           optional policy test cases (see execguard.arbiter.testing);
                           part of the content and the version, checked for shape only

Hidden files and directories (names starting with ``.``) are ignored; any
other file is refused. ExecGuard generates one Cedar action per surface from
the registry and appends the declarations to the schema, so the context each
policy sees is exactly the declared fields plus ``action``, ``facts`` and
``signals``.

Version: ``version`` is the lowercase hex SHA-256 of the RFC 8785 canonical
JSON of the object that maps each bundle file's relative POSIX path (for
example ``"policies/payments.cedar"``) to the lowercase hex SHA-256 of that
file's bytes. Ignored hidden files are not part of it.

Loading either returns a bundle that passed every check or raises
:class:`BundleInvalid` naming the file, the line and the key; nothing is
half-loaded.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files as package_files
from pathlib import Path, PurePosixPath
from typing import Any

import cedarpy

from execguard.arbiter.facts import FACT_TYPES
from execguard.arbiter.locate import Statement, blank_comments, locate_error, split_statements
from execguard.arbiter.registry import FieldSpec, SurfaceRegistry, parse_registry
from execguard.arbiter.testing import TESTS_DIR, is_case_file, parse_case_file
from execguard.protocol.errors import BundleInvalid, ConfigError
from execguard.protocol.policyversion import bundle_version

__all__ = [
    "PolicyBundle",
    "PolicyInfo",
    "bundle_version",
    "demo_bundle_path",
    "generate_schema",
]

SCHEMA_FILE = "schema.cedarschema"
REGISTRY_FILE = "surfaces.toml"
README_FILE = "README.md"
POLICY_DIR = "policies"
MAX_FILE_BYTES = 1 << 20

_REASON_RE = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*\Z")
_ACTION_DECL_RE = re.compile(r'^\s*action\s+"', re.MULTILINE)
_ACTION_SOURCE_RE = re.compile(r'(?<![\w"])action\s+["A-Za-z_]')
_POLICY_PREFIX_RE = re.compile(r"^for policy `policy\d+`, ")


@dataclass(frozen=True)
class PolicyInfo:
    """One policy of a bundle, as the engine and error messages need it."""

    cedar_id: str  # Cedar's positional id in the concatenated policy text: policy0, ...
    id: str  # the @id annotation
    effect: str  # "permit" or "forbid"
    reason: str | None  # the @reason annotation
    escalate: bool  # annotated @escalate (forbid only)
    file: str
    line: int | None  # line of the @id annotation


@dataclass(frozen=True, eq=False)
class PolicyBundle:
    """A validated, content-addressed policy bundle. Build it with a ``from_`` constructor."""

    files: dict[str, bytes]
    version: str
    registry: SurfaceRegistry
    schema_text: str  # the bundle's schema plus the generated action declarations
    policy_text: str  # all policy files, in sorted path order
    policies: tuple[PolicyInfo, ...]

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str]) -> PolicyBundle:
        """Load and validate the bundle in directory ``path``."""
        root = Path(path)
        if not root.is_dir():
            raise BundleInvalid("is not a directory", file=str(root))
        contents: dict[str, bytes] = {}
        for directory, subdirs, names in os.walk(root):
            subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
            for name in subdirs:
                if Path(directory, name).is_symlink():
                    # os.walk does not enter it: its files would silently not be loaded.
                    raise BundleInvalid(
                        "is a symbolic link to a directory, which a bundle cannot hold; "
                        "copy the directory in",
                        file=Path(directory, name).relative_to(root).as_posix())
            for name in sorted(names):
                if name.startswith("."):
                    continue
                full = Path(directory, name)
                relative = full.relative_to(root).as_posix()
                contents[relative] = _read_bundle_file(full, relative)
        return cls.from_files(contents)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> PolicyBundle:
        """Validate a bundle given as relative POSIX path -> file bytes."""
        contents = _select_files(files)
        texts = {path: _decode(path, data) for path, data in contents.items()}
        registry = parse_registry(texts[REGISTRY_FILE])
        schema_text, schema = _check_schema(texts[SCHEMA_FILE], registry)
        policy_paths = sorted(path for path in texts if path.startswith(POLICY_DIR + "/"))
        policies: list[PolicyInfo] = []
        for path in policy_paths:
            policies.extend(_read_policies(path, texts[path], len(policies)))
        _check_unique_ids(policies)
        policy_text = "\n".join(texts[path] for path in policy_paths)
        _check_against_schema(policy_text, schema, policies)
        for path in sorted(path for path in texts if is_case_file(path)):
            parse_case_file(path, texts[path])  # a malformed case refuses the bundle
        return cls(
            files=contents,
            version=bundle_version(contents),
            registry=registry,
            schema_text=schema_text,
            policy_text=policy_text,
            policies=tuple(policies),
        )


def demo_bundle_path() -> Path:
    """The directory of the demo bundle shipped inside the ``execguard`` package."""
    resource = package_files("execguard").joinpath("demo_bundle")
    if not isinstance(resource, Path) or not resource.is_dir():
        raise ConfigError(
            "the demo bundle is not available as a directory; install execguard from a "
            "wheel or source tree rather than a zip archive"
        )
    return resource


def _read_bundle_file(path: Path, relative: str) -> bytes:
    """A bundle file's bytes; never more than one byte past the size limit is read, so a
    huge file, a FIFO or a device is refused instead of exhausting memory or hanging."""
    try:
        if not path.is_file():
            raise BundleInvalid("is not a regular file", file=relative)
        with path.open("rb") as handle:
            return handle.read(MAX_FILE_BYTES + 1)  # from_files refuses the oversized
    except OSError as exc:
        raise BundleInvalid(f"cannot be read: {exc}", file=relative) from exc


def _select_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """Keep the bundle's files, drop hidden ones, refuse anything else."""
    selected: dict[str, bytes] = {}
    for path, data in files.items():
        parts = PurePosixPath(path).parts
        if any(part.startswith(".") for part in parts) and ".." not in parts:
            continue
        if (not path or "\\" in path or path.startswith("/") or ".." in parts
                or PurePosixPath(*parts).as_posix() != path):
            raise BundleInvalid("is not a plain relative POSIX path", file=path)
        is_policy = len(parts) == 2 and parts[0] == POLICY_DIR and parts[1].endswith(".cedar")
        if (not is_policy and not is_case_file(path)
                and path not in (SCHEMA_FILE, REGISTRY_FILE, README_FILE)):
            raise BundleInvalid(
                f"is not part of a policy bundle (allowed: {POLICY_DIR}/*.cedar, "
                f"{SCHEMA_FILE}, {REGISTRY_FILE}, {README_FILE}, {TESTS_DIR}/*.toml); "
                "remove it",
                file=path,
            )
        if not isinstance(data, bytes):
            raise BundleInvalid(f"content must be bytes, got {type(data).__name__}", file=path)
        if len(data) > MAX_FILE_BYTES:
            raise BundleInvalid(f"is larger than {MAX_FILE_BYTES} bytes", file=path)
        selected[path] = data
    for required in (SCHEMA_FILE, REGISTRY_FILE):
        if required not in selected:
            raise BundleInvalid("is missing from the bundle", file=required)
    if not any(path.startswith(POLICY_DIR + "/") for path in selected):
        raise BundleInvalid("holds no .cedar file; add at least one", file=POLICY_DIR + "/")
    return selected


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BundleInvalid("is not UTF-8 text", file=path, line=line) from None


def _field_decl(spec: FieldSpec) -> str:
    optional = "" if spec.required else "?"
    return f"{json.dumps(spec.name)}{optional}: {spec.cedar_type}"


def generate_schema(schema_text: str, registry: SurfaceRegistry) -> str:
    """The bundle's schema followed by one generated action declaration per surface."""
    base_facts = [f"{json.dumps(name)}: {types[1]}" for name, types in FACT_TYPES.items()]
    actions = []
    for surface in registry:
        facts = ", ".join(base_facts + [f"{json.dumps(f.name)}: {f.cedar_type}"
                                        for f in surface.facts.values()])
        context = [_field_decl(spec) for spec in surface.context.values()]
        signals = ", ".join(_field_decl(spec) for spec in surface.signals.values())
        context += [
            '"action": __cedar::String',
            f'"facts": {{ {facts} }}',
            f'"signals": {{ {signals} }}' if signals else '"signals": {}',
        ]
        actions.append(
            f"action {json.dumps(surface.name)} appliesTo {{\n"
            "  principal: [Actor],\n  resource: [Subject],\n"
            "  context: {\n    " + ",\n    ".join(context) + "\n  }\n};\n"
        )
    return (schema_text.rstrip() + "\n\n// Generated by ExecGuard from surfaces.toml.\n\n"
            + "\n".join(actions))


def _check_schema(text: str, registry: SurfaceRegistry) -> tuple[str, cedarpy.Schema]:
    """Check the bundle's own schema; return the full schema text and its parsed handle."""
    try:
        own = cedarpy.Schema.from_str(text)
    except ValueError as exc:
        line = locate_error(text, cedarpy.Schema.from_str, str(exc))
        raise BundleInvalid(f"not a valid Cedar schema: {exc}", file=SCHEMA_FILE,
                            line=line) from None
    rendered = str(own)
    if _ACTION_DECL_RE.search(rendered):
        match = _ACTION_SOURCE_RE.search(blank_comments(text))
        line = text.count("\n", 0, match.start()) + 1 if match else None
        raise BundleInvalid(
            "declares an action; remove it: ExecGuard generates one action per surface "
            "from surfaces.toml",
            file=SCHEMA_FILE, line=line,
        )
    for entity in ("Actor", "Subject"):
        if not re.search(rf"^entity {entity}\b", rendered, re.MULTILINE):
            raise BundleInvalid(
                f"does not declare the entity type {entity} (outside any namespace), "
                "which every generated action uses",
                file=SCHEMA_FILE, key=entity,
            )
        if re.search(rf"^entity {entity} enum\b", rendered, re.MULTILINE):
            raise BundleInvalid(
                f"declares {entity} as an enumerated entity type; it must accept any id",
                file=SCHEMA_FILE, key=entity,
            )
        if not re.search(rf"^entity {entity};$", rendered, re.MULTILINE):
            # ExecGuard passes no entity data: a policy reading an attribute, a tag or a
            # group of the principal or resource could never see it (a guarded forbid
            # would never fire, and the request would be permitted).
            raise BundleInvalid(
                f"gives {entity} attributes, tags or parent types, but ExecGuard passes no "
                f"entity data: declare it as 'entity {entity};' and decide from the context",
                file=SCHEMA_FILE, key=entity,
            )
    full = generate_schema(text, registry)
    try:
        schema = cedarpy.Schema.from_str(full)
    except ValueError as exc:
        raise BundleInvalid(
            f"does not combine with the actions generated from {REGISTRY_FILE}: {exc}",
            file=SCHEMA_FILE,
        ) from None
    return full, schema


def _annotation_line(statement: Statement | None, name: str) -> int | None:
    if statement is None:
        return None
    line = statement.line_of(rf"@{name}\b")
    return line if line is not None else statement.start_line


#: The annotations ExecGuard reads; others are the author's own (@description, @owner).
KNOWN_ANNOTATIONS = ("id", "reason", "escalate", "approvers", "quorum")


def _check_approval_annotations(annotations: Mapping[str, Any], escalate: bool, path: str,
                                statement: Statement | None, policy_id: str) -> None:
    """Refuse approval annotations that would be ignored: a rule of two approvers must
    never quietly become one (a misspelt @quorom, an @approvers on a permit, an empty
    value taking the default)."""
    for name in annotations:
        if name in KNOWN_ANNOTATIONS:
            continue
        close = difflib.get_close_matches(name, KNOWN_ANNOTATIONS, n=1, cutoff=0.75)
        if close:
            raise BundleInvalid(f"unknown annotation @{name}: did you mean @{close[0]}?",
                                file=path, line=_annotation_line(statement, name),
                                key=policy_id)
    for name in ("approvers", "quorum"):
        if name not in annotations:
            continue
        line = _annotation_line(statement, name)
        if not escalate:
            raise BundleInvalid(f"@{name} applies only to a forbid marked @escalate (it says "
                                "who approves the escalation); here it would be ignored",
                                file=path, line=line, key=policy_id)
        if not annotations[name]:
            raise BundleInvalid(f"@{name} needs a value, such as "
                                + ('@approvers("finance")' if name == "approvers"
                                   else '@quorum("2")'),
                                file=path, line=line, key=policy_id)


def _read_policies(path: str, text: str, offset: int) -> list[PolicyInfo]:
    """Parse one policy file and check its annotations; ``offset`` policies come before it."""
    try:
        parsed = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        line = locate_error(text, cedarpy.policies_to_json_str, str(exc))
        raise BundleInvalid(f"Cedar syntax error: {exc}", file=path, line=line) from None
    statements = split_statements(text)
    entries = {**parsed.get("templates", {}), **parsed.get("staticPolicies", {})}
    if len(statements) != len(entries):
        statements = []  # the scanner disagrees with Cedar: report without lines
    infos: list[PolicyInfo] = []
    for local_id in sorted(entries, key=lambda pid: int(pid.removeprefix("policy"))):
        index = int(local_id.removeprefix("policy"))
        statement = statements[index] if statements else None
        policy = entries[local_id]
        annotations: dict[str, Any] = policy.get("annotations", {})
        policy_id = annotations.get("id")
        if not isinstance(policy_id, str) or not policy_id.strip():
            raise BundleInvalid(
                'policy has no @id; give every policy a unique @id("...")',
                file=path, line=statement.start_line if statement else None,
            )
        line = _annotation_line(statement, "id")
        if local_id in parsed.get("templates", {}):
            raise BundleInvalid(
                "templates (?principal / ?resource slots) are not supported; "
                "write a static policy", file=path, line=line, key=policy_id,
            )
        reason = annotations.get("reason")
        if "reason" in annotations and not (isinstance(reason, str) and _REASON_RE.match(reason)):
            raise BundleInvalid(
                f'@reason must be an UPPER_SNAKE_CASE code such as @reason("WITHIN_LIMIT"), '
                f"got {reason!r}",
                file=path, line=_annotation_line(statement, "reason"), key=policy_id,
            )
        escalate = "escalate" in annotations
        if escalate and policy["effect"] != "forbid":
            raise BundleInvalid(
                "@escalate applies only to forbid policies (it turns a DENY into ESCALATE)",
                file=path, line=_annotation_line(statement, "escalate"), key=policy_id,
            )
        if escalate and annotations["escalate"] not in (None, ""):
            raise BundleInvalid(
                "write @escalate without a value", file=path,
                line=_annotation_line(statement, "escalate"), key=policy_id,
            )
        _check_approval_annotations(annotations, escalate, path, statement, policy_id)
        infos.append(PolicyInfo(
            cedar_id=f"policy{offset + index}", id=policy_id, effect=policy["effect"],
            reason=reason, escalate=escalate, file=path, line=line,
        ))
    return infos


def _check_unique_ids(policies: list[PolicyInfo]) -> None:
    seen: dict[str, PolicyInfo] = {}
    for info in policies:
        first = seen.setdefault(info.id, info)
        if first is not info:
            raise BundleInvalid(
                f"@id {info.id!r} is already used at {first.file}:{first.line}; "
                "every @id must be unique",
                file=info.file, line=info.line, key=info.id,
            )


def _position(error: cedarpy.ValidationError) -> int:
    # Report errors in source order; one without a policy id (a parse error) first.
    suffix = error.policy_id.removeprefix("policy")
    return int(suffix) if suffix.isdigit() else -1


def _check_against_schema(
    text: str, schema: cedarpy.Schema, policies: list[PolicyInfo]
) -> None:
    result = cedarpy.validate_policies(text, schema)
    if result.validation_passed:
        return
    by_cedar_id = {info.cedar_id: info for info in policies}
    errors = sorted(result.errors, key=_position)
    first = errors[0] if errors else None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    info = by_cedar_id.get(first.policy_id) if first else None
    detail = _POLICY_PREFIX_RE.sub("", first.error) if first else "validation failed"
    raise BundleInvalid(
        f"policy does not validate against the schema: {detail}{more}",
        file=info.file if info else POLICY_DIR + "/",
        line=info.line if info else None,
        key=info.id if info else None,
    )
