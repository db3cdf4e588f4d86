"""Settings, read once at start into a frozen object. Errors name the variable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from execguard.protocol.errors import ConfigError

__all__ = ["DEFAULT_DATA_DIR", "Settings"]

DEFAULT_DATA_DIR = ".execguard"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"setting {name} has value {raw!r}: not a whole number") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"setting {name} has value {raw}: must be from {minimum:,} to "
                          f"{maximum:,}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float,
           maximum: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"setting {name} has value {raw!r}: not a number") from None
    if not minimum <= value <= maximum:  # also refuses nan and inf
        raise ConfigError(f"setting {name} has value {raw}: must be from {minimum:g} to "
                          f"{maximum:g}")
    return value


_DAY = 86400


@dataclass(frozen=True)
class Settings:
    """Everything the gateway is configured with."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    host: str = "127.0.0.1"
    port: int = 8080
    #: Largest accepted request body, in bytes (413 above it).
    max_body_bytes: int = 256 * 1024
    #: Lifetime of an execution token, in seconds.
    token_ttl_seconds: int = 60
    #: How long an idempotency key is remembered, in seconds.
    idempotency_ttl_seconds: int = 24 * 3600
    #: Named in every receipt and token as the issuing authority; also the checkpoint key name.
    authority_id: str = "execguard"
    #: A log that grew gets a new signed checkpoint at most this often, in seconds.
    checkpoint_interval_seconds: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read ``EXECGUARD_*`` variables; explicit overrides (CLI flags) win when not None."""
        env = os.environ if env is None else env
        settings = cls(
            data_dir=Path(env.get("EXECGUARD_DATA") or DEFAULT_DATA_DIR),
            host=env.get("EXECGUARD_HOST") or "127.0.0.1",
            port=_int(env, "EXECGUARD_PORT", 8080, 0, 65535),
            max_body_bytes=_int(env, "EXECGUARD_MAX_BODY_BYTES", 256 * 1024, 1024, 1 << 30),
            token_ttl_seconds=_int(env, "EXECGUARD_TOKEN_TTL_SECONDS", 60, 1, 90 * _DAY),
            idempotency_ttl_seconds=_int(env, "EXECGUARD_IDEMPOTENCY_TTL_SECONDS", _DAY, 1,
                                         3660 * _DAY),
            authority_id=env.get("EXECGUARD_AUTHORITY_ID") or "execguard",
            checkpoint_interval_seconds=_float(env, "EXECGUARD_CHECKPOINT_INTERVAL_SECONDS",
                                               1.0, 0.01, 3600.0),
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "data_dir" in given:
            given["data_dir"] = Path(str(given["data_dir"]))
        settings = replace(settings, **given)  # type: ignore[arg-type]
        _check_listen_address(settings.host, settings.port)
        _check_authority_id(settings.authority_id)
        return settings


def _check_listen_address(host: str, port: int) -> None:
    # A flag is checked here too: an empty host would listen on every interface, and a
    # port out of range would fail only inside the server, as a traceback.
    if not host.strip():
        raise ConfigError("the address to listen on (--host, EXECGUARD_HOST) is empty: give "
                          "one, such as 127.0.0.1, or 0.0.0.0 for every interface")
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} (--port, EXECGUARD_PORT): must be from 0 to 65,535")


def _check_authority_id(authority_id: str) -> None:
    # It names the key of every signed checkpoint, and signed-note key names hold no space,
    # no plus and no control character: a gateway started with one could sign no checkpoint.
    if any(c.isspace() or c == "+" or c < " " for c in authority_id):
        raise ConfigError(f"setting EXECGUARD_AUTHORITY_ID has value {authority_id!r}: it "
                          "names checkpoint keys, so no spaces, '+' or control characters")
