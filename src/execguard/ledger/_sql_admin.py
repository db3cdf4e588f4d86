"""Tenants, keys, policy bundles, shadow policies and webhooks in the SQL ledger.

The administrative half of :class:`~execguard.ledger.sql.SQLStore`; the log
and everything appended through it is in ``sql.py``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from execguard.ledger._sql_approvals import add_webhook, list_webhooks
from execguard.ledger._sql_util import dumps
from execguard.ledger.records import ApiKeyRecord, BundleRecord, SigningKeyRecord, WebhookRecord
from execguard.protocol.errors import NotFound

__all__ = ["AdminMixin", "Connection", "Cursor"]


class Cursor(Protocol):
    """What a statement returns: rows, and how many rows it changed."""

    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Any: ...


class Connection(Protocol):
    """A DB-API style connection taking ``?`` parameter markers (SQLite's own, or an adapter)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, rows: Any, /) -> Any: ...


def _require_bundle(conn: Connection, tenant: str, version: str) -> None:
    """``NotFound`` unless the tenant has stored this bundle version (before naming it)."""
    if conn.execute("SELECT 1 FROM bundles WHERE tenant = ? AND version = ?",
                    (tenant, version)).fetchone() is None:
        raise NotFound(f"policy version {version} is not stored for tenant {tenant!r}")


class AdminMixin:
    """Needs ``_read(what)`` (a connection) and ``_write(what)`` (a write transaction)."""

    _read: Callable[[str], AbstractContextManager[Connection]]
    _write: Callable[[str], AbstractContextManager[Connection]]

    # -- tenants and keys --------------------------------------------------------------

    def create_tenant(self, name: str, now: str) -> bool:
        """Create a tenant; False if it already exists."""
        with self._write("creating a tenant") as conn:
            cur = conn.execute("INSERT INTO tenants VALUES (?, ?) ON CONFLICT DO NOTHING",
                               (name, now))
            return cur.rowcount == 1

    def tenant_exists(self, name: str) -> bool:
        """Whether the tenant exists."""
        with self._read("reading tenants") as conn:
            row = conn.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone()
        return row is not None

    def add_api_key(self, record: ApiKeyRecord) -> None:
        """Store an API key by its hash."""
        if not self.tenant_exists(record.tenant):
            raise NotFound(f"tenant {record.tenant!r} does not exist")
        with self._write("storing an API key") as conn:
            conn.execute("INSERT INTO api_keys (key_hash, tenant, role, label, created_at,"
                         " groups) VALUES (?, ?, ?, ?, ?, ?)",
                         (record.key_hash, record.tenant, record.role, record.label,
                          record.created_at, ",".join(record.groups)))

    def lookup_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        """The API key with this hash, or None (also if it was revoked)."""
        with self._read("reading API keys") as conn:
            row = conn.execute(f"SELECT {_API_KEY_COLUMNS} FROM api_keys"
                               " WHERE key_hash = ? AND revoked_at IS NULL",
                               (key_hash,)).fetchone()
        return None if row is None else _api_key(row)

    def api_keys(self, tenant: str) -> list[ApiKeyRecord]:
        """The tenant's API keys, revoked ones included, oldest first."""
        with self._read("reading API keys") as conn:
            rows = conn.execute(f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE tenant = ?"
                                " ORDER BY created_at, key_hash", (tenant,)).fetchall()
        return [_api_key(row) for row in rows]

    def revoke_api_key(self, key_hash: str, now: str) -> bool:
        """Revoke a key for good; False if there is no such key or it was revoked before."""
        with self._write("revoking an API key") as conn:
            cur = conn.execute("UPDATE api_keys SET revoked_at = ? WHERE key_hash = ?"
                               " AND revoked_at IS NULL", (now, key_hash))
            return cur.rowcount == 1

    def add_signing_key(self, record: SigningKeyRecord) -> None:
        """Publish a public signing key."""
        with self._write("storing a signing key") as conn:
            conn.execute("INSERT INTO signing_keys VALUES (?, ?, ?, ?)",
                         (record.key_id, record.public_pem, record.status, record.created_at))

    def rotate_signing_key(self, record: SigningKeyRecord) -> list[str]:
        """Publish ``record`` as the only active key; return the ids of the keys it retires."""
        with self._write("rotating the signing key") as conn:
            retired = [r[0] for r in conn.execute(
                "SELECT key_id FROM signing_keys WHERE status = 'active'")]
            conn.execute("UPDATE signing_keys SET status = 'retired' WHERE status = 'active'")
            conn.execute("INSERT INTO signing_keys VALUES (?, ?, ?, ?)",
                         (record.key_id, record.public_pem, "active", record.created_at))
        return retired

    def signing_keys(self) -> list[SigningKeyRecord]:
        """Every published key, oldest first."""
        with self._read("reading signing keys") as conn:
            rows = conn.execute(
                "SELECT key_id, public_pem, status, created_at FROM signing_keys"
                " ORDER BY created_at, key_id").fetchall()
        return [SigningKeyRecord(*row) for row in rows]

    # -- policy bundles ----------------------------------------------------------------

    def put_bundle(self, tenant: str, version: str, files: Mapping[str, bytes],
                   now: str) -> bool:
        """Store an immutable bundle; False if the version is already stored."""
        encoded = dumps({path: base64.b64encode(data).decode("ascii")
                          for path, data in sorted(files.items())})
        with self._write("storing a policy bundle") as conn:
            cur = conn.execute("INSERT INTO bundles VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                               (tenant, version, encoded, now))
            return cur.rowcount == 1

    def get_bundle(self, tenant: str, version: str) -> BundleRecord | None:
        """The bundle with its files, or None."""
        with self._read("reading a policy bundle") as conn:
            row = conn.execute(
                "SELECT b.files, b.created_at, a.version IS NOT NULL FROM bundles b"
                " LEFT JOIN active_bundles a ON a.tenant = b.tenant AND a.version = b.version"
                " WHERE b.tenant = ? AND b.version = ?", (tenant, version)).fetchone()
        if row is None:
            return None
        files = {path: base64.b64decode(data) for path, data in json.loads(row[0]).items()}
        return BundleRecord(tenant, version, row[1], bool(row[2]), files)

    def list_bundles(self, tenant: str) -> list[BundleRecord]:
        """The tenant's bundles, oldest first."""
        with self._read("listing policy bundles") as conn:
            rows = conn.execute(
                "SELECT b.version, b.created_at, a.version IS NOT NULL FROM bundles b"
                " LEFT JOIN active_bundles a ON a.tenant = b.tenant AND a.version = b.version"
                " WHERE b.tenant = ? ORDER BY b.created_at, b.version", (tenant,)).fetchall()
        return [BundleRecord(tenant, version, created, bool(active))
                for version, created, active in rows]

    def activate_bundle(self, tenant: str, version: str, now: str) -> None:
        """Make a stored version the tenant's active one."""
        with self._write("activating a policy bundle") as conn:
            _require_bundle(conn, tenant, version)
            conn.execute("INSERT INTO active_bundles VALUES (?, ?, ?) ON CONFLICT (tenant)"
                         " DO UPDATE SET version = excluded.version,"
                         " activated_at = excluded.activated_at", (tenant, version, now))

    def active_bundle_version(self, tenant: str) -> str | None:
        """The tenant's active policy version, or None."""
        with self._read("reading the active policy") as conn:
            row = conn.execute("SELECT version FROM active_bundles WHERE tenant = ?",
                               (tenant,)).fetchone()
        return row[0] if row else None

    # -- shadow policies and webhooks -----------------------------------------------

    def set_shadow(self, tenant: str, version: str | None, now: str) -> None:
        """Evaluate ``version`` beside the active policy on live traffic (None: stop)."""
        with self._write("setting the shadow policy") as conn:
            if version is None:
                conn.execute("DELETE FROM shadow_bundles WHERE tenant = ?", (tenant,))
                return
            _require_bundle(conn, tenant, version)
            conn.execute("INSERT INTO shadow_bundles VALUES (?, ?, ?) ON CONFLICT (tenant)"
                         " DO UPDATE SET version = excluded.version,"
                         " started_at = excluded.started_at", (tenant, version, now))

    def shadow_version(self, tenant: str) -> str | None:
        """The tenant's shadow policy version, or None."""
        with self._read("reading the shadow policy") as conn:
            row = conn.execute("SELECT version FROM shadow_bundles WHERE tenant = ?",
                               (tenant,)).fetchone()
        return row[0] if row else None

    def shadow_disagreements(self, tenant: str, version: str | None = None,
                             limit: int = 10000) -> list[dict[str, Any]]:
        """Decisions where the shadow policy would have decided differently, newest first."""
        sql = ("SELECT execution_id, surface, active_version, shadow_version, active_decision,"
               " active_reason, shadow_decision, shadow_reason, created_at FROM"
               " shadow_disagreements WHERE tenant = ?")
        params: tuple[Any, ...] = (tenant,)
        if version is not None:
            sql += " AND shadow_version = ?"
            params += (version,)
        keys = ("executionId", "surface", "activeVersion", "shadowVersion", "activeDecision",
                "activeReason", "shadowDecision", "shadowReason", "timestamp")
        with self._read("reading shadow disagreements") as conn:
            rows = conn.execute(sql + " ORDER BY created_at DESC LIMIT ?",
                                (*params, limit)).fetchall()
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def add_webhook(self, record: WebhookRecord) -> None:
        """Register a receiver of the tenant's approval events."""
        with self._write("storing a webhook") as conn:
            add_webhook(conn, record)

    def remove_webhook(self, tenant: str, webhook_id: str) -> bool:
        """Forget a webhook; False if the tenant has none with this id."""
        with self._write("removing a webhook") as conn:
            return conn.execute("DELETE FROM webhooks WHERE tenant = ? AND id = ?",
                                (tenant, webhook_id)).rowcount == 1

    def webhooks(self, tenant: str) -> list[WebhookRecord]:
        """The tenant's webhooks."""
        with self._read("reading webhooks") as conn:
            rows = list_webhooks(conn, tenant)
        return [WebhookRecord(r[0], r[1], r[2], r[3], r[4], tuple(r[5].split(",")), r[6])
                for r in rows]


_API_KEY_COLUMNS = "key_hash, tenant, role, label, created_at, groups, revoked_at"


def _api_key(row: Sequence[Any]) -> ApiKeyRecord:
    return ApiKeyRecord(*row[:5], groups=tuple(g for g in row[5].split(",") if g),
                        revoked_at=row[6])
