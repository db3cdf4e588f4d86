"""The execution proxy's configuration: one TOML file, validated strictly at start.

Every problem is one :class:`ConfigError` naming the file and the key
(``proxy.toml: routes[0].context.amount: ...``), so ``execguard proxy`` exits 1
with a line that says what to fix. Secrets are never in the file: the API key
and upstream credentials are read from environment variables it names, and
they never appear in an error message or a ``repr``.

    [gateway]
    url = "http://127.0.0.1:8080"          # or EXECGUARD_URL
    api_key_env = "EXECGUARD_API_KEY"
    timeout_seconds = 5
    keys = "keys.json"                      # optional pinned keys document

    [upstream]
    url = "http://127.0.0.1:9000"
    headers = { Authorization = "env:PAYMENTS_API_TOKEN" }

    [[routes]]
    method = "POST"
    path = "/payments"
    surface = "payment.execute"
    actor = "header:X-Agent-Id"
    [routes.context]
    amount = "json:amount"

    [litellm]
    surface = "tool.invoke"
    upstream_path = "/v1/chat/completions"

See docs/PROXY.md for every key.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from execguard.gate._core import check_base_url, check_gateway_url
from execguard.protocol.errors import ConfigError, VerificationError
from execguard.protocol.request import RESERVED_CONTEXT_KEYS
from execguard.verify import KeySet

__all__ = [
    "METHODS",
    "RESERVED_PATHS",
    "SOURCE_KINDS",
    "GatewayConfig",
    "LiteLLMConfig",
    "ProxyConfig",
    "RouteConfig",
    "Source",
    "UpstreamConfig",
    "load_proxy_config",
    "parse_proxy_config",
]

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
#: Where a value of the request comes from: ``json:a.b``, ``path:p``, ``query:q``,
#: ``header:H``, ``const:text``.
SOURCE_KINDS = ("json", "path", "query", "header", "const")
#: Paths the proxy answers itself; no route may claim them.
RESERVED_PATHS = frozenset({"/healthz", "/proxy/execute"})

_SURFACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}\Z")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110 header field name
_PARAM_RE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")
# A plain path segment; no ";" (a servlet upstream would read what follows as parameters).
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._~!$&'()*+,=:@-]+\Z")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}\Z")

_DEFAULT_GATEWAY_TIMEOUT = 5.0
_DEFAULT_UPSTREAM_TIMEOUT = 30.0
_DEFAULT_MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Source:
    """Where one value of the execution request is read from in the HTTP request.

    ``kind`` is one of :data:`SOURCE_KINDS`; ``arg`` is the JSON path (a tuple of
    keys), the path parameter, query parameter or header name, or the constant.
    """

    kind: str
    arg: Any
    spec: str


@dataclass(frozen=True)
class RouteConfig:
    """One governed endpoint of the upstream: ``method path`` decided on ``surface``."""

    method: str
    path: str
    #: The path template split at ``/``: a literal segment, or ``None`` for ``{param}``.
    segments: tuple[str | None, ...]
    params: tuple[str, ...]
    surface: str
    actor: Source | None = None
    action: str | None = None
    context: Mapping[str, Source] = field(default_factory=dict)
    signals: Mapping[str, Source] = field(default_factory=dict)

    @property
    def reads_json(self) -> bool:
        """Whether the request body must be parsed (a value comes from ``json:``)."""
        sources = [*self.context.values(), *self.signals.values(),
                   *([self.actor] if self.actor else [])]
        return any(s.kind == "json" for s in sources)


@dataclass(frozen=True)
class GatewayConfig:
    """How the proxy reaches the ExecGuard gateway."""

    url: str
    api_key: str | None = field(repr=False)
    timeout_seconds: float = _DEFAULT_GATEWAY_TIMEOUT
    #: The pinned keys document, or None to fetch (and cache) the gateway's.
    keys: KeySet | None = field(default=None, repr=False)


@dataclass(frozen=True)
class UpstreamConfig:
    """The API behind the proxy and the credentials only the proxy holds."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout_seconds: float = _DEFAULT_UPSTREAM_TIMEOUT
    max_body_bytes: int = _DEFAULT_MAX_BODY


@dataclass(frozen=True)
class LiteLLMConfig:
    """The ``/proxy/execute`` path of ``trigguard-litellm``'s protected mode."""

    surface: str
    upstream_path: str
    allowed_surfaces: frozenset[str]


@dataclass(frozen=True)
class ProxyConfig:
    """A validated proxy configuration (secrets resolved from the environment)."""

    gateway: GatewayConfig
    upstream: UpstreamConfig
    routes: tuple[RouteConfig, ...] = ()
    litellm: LiteLLMConfig | None = None
    source: str = "<config>"


class _Reader:
    """Reads one table, naming every key it complains about, refusing unknown ones."""

    def __init__(self, origin: str, where: str, table: Any) -> None:
        self.origin = origin
        self.where = where
        if not isinstance(table, dict):
            self.fail(where, f"expected a table, got {_kind(table)}")
        self.table: dict[str, Any] = table

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.origin}: {key}: {problem}")

    def only(self, *allowed: str) -> None:
        for key in self.table:
            if key not in allowed:
                self.fail(self.name(key), "unknown key (allowed: " + ", ".join(allowed) + ")")

    def text(self, key: str, *, default: str | None = None,
             pattern: re.Pattern[str] | None = None, expected: str = "a string") -> str | None:
        if key not in self.table:
            return default
        value = self.table[key]
        if not isinstance(value, str) or not value or (pattern and not pattern.match(value)):
            self.fail(self.name(key), f"expected {expected}, got {_kind(value)}")
        return value

    def required(self, key: str, *, pattern: re.Pattern[str] | None = None,
                 expected: str = "a string") -> str:
        value = self.text(key, pattern=pattern, expected=expected)
        if value is None:
            self.fail(self.name(key), "missing (required)")
        return value

    def number(self, key: str, default: float, *, integer: bool = False) -> float:
        if key not in self.table:
            return default
        value = self.table[key]
        kinds = (int,) if integer else (int, float)
        # inf is no limit (a hung peer would hold a request forever); nan is no number.
        if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0 \
                or not math.isfinite(value):
            self.fail(self.name(key), "expected a positive, finite "
                      f"{'whole number' if integer else 'number'}, got {_kind(value)}")
        return float(value)

    def sub(self, key: str, *, required: bool = False) -> _Reader | None:
        if key not in self.table:
            if required:
                self.fail(self.name(key), "missing (required)")
            return None
        return _Reader(self.origin, self.name(key), self.table[key])


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _http_url(reader: _Reader, key: str, value: str,
              check: Callable[[str], str] = check_base_url) -> str:
    if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?\Z", value):
        reader.fail(key, f"expected an http(s) URL without query or fragment, got {_kind(value)}")
    try:
        return check(value)
    except ConfigError as exc:
        reader.fail(key, str(exc))


def _env(reader: _Reader, key: str, name: str, env: Mapping[str, str]) -> str:
    if not _ENV_RE.match(name):
        reader.fail(key, f"{name!r} is not an environment variable name")
    value = env.get(name)
    if not value:
        reader.fail(key, f"environment variable {name} is not set")
    return value


def _source(reader: _Reader, key: str, spec: Any, params: tuple[str, ...]) -> Source:
    """Parse ``kind:arg``; a TOML number or boolean is a constant."""
    if isinstance(spec, bool | int | float):
        return Source("const", spec, repr(spec))
    if not isinstance(spec, str):
        reader.fail(key, f"expected a source such as 'json:amount', got {_kind(spec)}")
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS:
        reader.fail(key, f"unknown source {spec!r} (use one of "
                    + ", ".join(f"'{k}:...'" for k in SOURCE_KINDS) + ")")
    if kind == "const":
        return Source("const", arg, spec)
    if not arg:
        reader.fail(key, f"source {spec!r} names nothing after '{kind}:'")
    if kind == "json":
        parts = tuple(arg.split("."))
        if any(not p for p in parts):
            reader.fail(key, f"source {spec!r} has an empty part in its dotted path")
        return Source("json", parts, spec)
    if kind == "path" and arg not in params:
        reader.fail(key, f"source {spec!r}: the route's path has no {{{arg}}} parameter")
    if kind == "header":
        if not _TOKEN_RE.match(arg):
            reader.fail(key, f"source {spec!r} is not a valid header name")
        arg = arg.lower()
    return Source(kind, arg, spec)


def _path_template(reader: _Reader, key: str, path: str) -> tuple[tuple[str | None, ...],
                                                                 tuple[str, ...]]:
    if not path.startswith("/") or "?" in path or "#" in path:
        reader.fail(key, f"expected a path starting with '/', got {_kind(path)}")
    if path in RESERVED_PATHS:
        reader.fail(key, f"{path} is answered by the proxy itself")
    segments: list[str | None] = []
    params: list[str] = []
    for segment in path[1:].split("/") if path != "/" else []:
        match = _PARAM_RE.match(segment)
        if match:
            if match.group(1) in params:
                reader.fail(key, f"parameter {{{match.group(1)}}} appears twice")
            params.append(match.group(1))
            segments.append(None)
        elif segment in (".", "..") or not _SEGMENT_RE.match(segment):
            reader.fail(key, f"segment {segment!r} is neither a plain name nor a {{param}}")
        else:
            segments.append(segment)
    return tuple(segments), tuple(params)


def _values(reader: _Reader | None, params: tuple[str, ...],
            reserved: frozenset[str] = frozenset()) -> dict[str, Source]:
    if reader is None:
        return {}
    values: dict[str, Source] = {}
    for name, spec in reader.table.items():
        key = reader.name(name)
        if not _KEY_RE.match(name):
            reader.fail(key, "field names are letters, digits and _ . : -")
        if name in reserved:
            reader.fail(key, f"{name!r} is computed by ExecGuard and cannot be sent")
        values[name] = _source(reader, key, spec, params)
    return values


def _route(origin: str, index: int, table: Any) -> RouteConfig:
    reader = _Reader(origin, f"routes[{index}]", table)
    reader.only("method", "path", "surface", "actor", "action", "context", "signals")
    method = reader.required("method", expected="one of " + ", ".join(METHODS))
    if method.upper() not in METHODS:
        reader.fail(reader.name("method"), f"expected one of {', '.join(METHODS)}, "
                    f"got {_kind(method)}")
    path = reader.required("path")
    segments, params = _path_template(reader, reader.name("path"), path)
    surface = reader.required("surface", pattern=_SURFACE_RE,
                              expected="a surface name such as 'payment.execute'")
    actor = None
    if "actor" in reader.table:
        actor = _source(reader, reader.name("actor"), reader.table["actor"], params)
    action = reader.text("action", expected="an action name (a string of 1 to 200 characters)")
    if action is not None and len(action) > 200:
        reader.fail(reader.name("action"), "longer than 200 characters")
    return RouteConfig(
        method=method.upper(), path=path, segments=segments, params=params,
        surface=surface, actor=actor, action=action,
        context=_values(reader.sub("context"), params, RESERVED_CONTEXT_KEYS),
        signals=_values(reader.sub("signals"), params))


def _keys_file(reader: _Reader, base: Path) -> KeySet | None:
    name = reader.text("keys", expected="the path of a keys document (JSON)")
    if name is None:
        return None
    path = Path(name) if Path(name).is_absolute() else base / name
    try:
        return KeySet.from_document(json.loads(path.read_bytes()))
    except OSError as exc:
        reader.fail(reader.name("keys"), f"cannot read {path}: {exc.strerror}")
    except ValueError as exc:
        reader.fail(reader.name("keys"), f"{path} is not JSON: {exc}")
    except VerificationError as exc:
        reader.fail(reader.name("keys"), f"{path} is not a usable keys document: {exc}")


def parse_proxy_config(document: Mapping[str, Any], *, env: Mapping[str, str] | None = None,
                       base: Path = Path("."), origin: str = "<config>") -> ProxyConfig:
    """Validate a parsed TOML document; raise :class:`ConfigError` naming the key."""
    env = os.environ if env is None else env
    top = _Reader(origin, "", dict(document))
    top.only("gateway", "upstream", "routes", "litellm")

    # [[routes]] and [litellm] first: whether an API key is needed depends on them.
    raw_routes = top.table.get("routes", [])
    if not isinstance(raw_routes, list):
        top.fail("routes", "expected an array of tables ([[routes]])")
    routes = tuple(_route(origin, i, t) for i, t in enumerate(raw_routes))
    seen: dict[tuple[str, tuple[str | None, ...]], int] = {}
    for index, route in enumerate(routes):
        shape = (route.method, route.segments)
        if shape in seen:
            top.fail(f"routes[{index}].path", f"{route.method} {route.path} is the same "
                     f"endpoint as routes[{seen[shape]}]")
        seen[shape] = index

    litellm = None
    lite = top.sub("litellm")
    if lite is not None:
        lite.only("surface", "upstream_path", "allowed_surfaces")
        surface = lite.text("surface", default="tool.invoke", pattern=_SURFACE_RE,
                            expected="a surface name such as 'tool.invoke'") or "tool.invoke"
        upstream_path = lite.required("upstream_path")
        if not upstream_path.startswith("/"):
            lite.fail(lite.name("upstream_path"), f"expected a path starting with '/', "
                      f"got {_kind(upstream_path)}")
        allowed = lite.table.get("allowed_surfaces", [surface])
        if not isinstance(allowed, list) or not allowed or not all(
                isinstance(s, str) and _SURFACE_RE.match(s) for s in allowed):
            lite.fail(lite.name("allowed_surfaces"), "expected a non-empty array of surface "
                      f"names, got {_kind(allowed)}")
        if surface not in allowed:
            lite.fail(lite.name("allowed_surfaces"), f"does not include the default surface "
                      f"{surface!r}")
        litellm = LiteLLMConfig(surface, upstream_path, frozenset(allowed))
    if not routes and litellm is None:
        top.fail("routes", "no [[routes]] and no [litellm]: there is nothing to proxy")

    gw = top.sub("gateway") or _Reader(origin, "gateway", {})
    gw.only("url", "api_key_env", "timeout_seconds", "keys")
    url = gw.text("url", expected="an http(s) URL") or env.get("EXECGUARD_URL")
    if not url:
        gw.fail("gateway.url", "missing (set it here or in EXECGUARD_URL)")
    gateway_url = _http_url(gw, "gateway.url", url, check_gateway_url)
    key_env = gw.text("api_key_env", expected="an environment variable name") \
        or "EXECGUARD_API_KEY"
    # The routes decide with the proxy's own key; /proxy/execute with each caller's key.
    api_key = _env(gw, "gateway.api_key_env", key_env, env) if routes else \
        (env.get(key_env) or None)
    gateway = GatewayConfig(url=gateway_url, api_key=api_key,
                            timeout_seconds=gw.number("timeout_seconds", _DEFAULT_GATEWAY_TIMEOUT),
                            keys=_keys_file(gw, base))

    up = top.sub("upstream", required=True)
    assert up is not None
    up.only("url", "headers", "timeout_seconds", "max_body_bytes")
    upstream_url = _http_url(up, "upstream.url", up.required("url"))
    headers: dict[str, str] = {}
    head = up.sub("headers")
    for name, value in (head.table.items() if head else ()):
        key = f"upstream.headers.{name}"
        if not _TOKEN_RE.match(name):
            up.fail(key, "not a valid header name")
        if not isinstance(value, str):
            up.fail(key, f"expected a string or 'env:NAME', got {_kind(value)}")
        if value.startswith("env:"):
            value = _env(up, key, value[4:], env)
        # HTTP sends header values as bytes; only visible ASCII, spaces and tabs mean the
        # same to every reader (and the HTTP client refuses the rest when it sends).
        if not all(c == "\t" or " " <= c <= "~" for c in value):
            up.fail(key, "the value holds a character that is not printable ASCII (a line "
                    "break, a control character or a non-ASCII letter)")
        headers[name] = value
    upstream = UpstreamConfig(
        url=upstream_url, headers=headers,
        timeout_seconds=up.number("timeout_seconds", _DEFAULT_UPSTREAM_TIMEOUT),
        max_body_bytes=int(up.number("max_body_bytes", _DEFAULT_MAX_BODY, integer=True)))
    return ProxyConfig(gateway=gateway, upstream=upstream, routes=routes, litellm=litellm,
                       source=origin)


def load_proxy_config(path: Path, *, env: Mapping[str, str] | None = None) -> ProxyConfig:
    """Read and validate a proxy configuration file (relative ``keys`` paths are from its
    directory); raise :class:`ConfigError` with one line naming the file and key."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read proxy configuration {path}: {exc.strerror}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_proxy_config(document, env=env, base=path.parent, origin=str(path))
