"""Database locations: a SQLite file path or a PostgreSQL URL (no driver imported here)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["is_postgres_url", "redact_url"]


def is_postgres_url(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database."""
    return url.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """The URL without its password, in the user part or in the query (libpq takes it
    there too), for messages and logs. Never raises: a URL that does not parse is cut
    to its scheme."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a bracket left open: nothing of it can be shown safely
        return url.partition("://")[0] + "://..."
    user, at, host = parts.netloc.rpartition("@")
    if at and ":" in user:
        user = user.split(":", 1)[0] + ":***"
    query = "&".join("password=***" if item.partition("=")[0].lower() == "password" else item
                     for item in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(netloc=f"{user}{at}{host}", query=query))
