"""The SQLite ledger's schema and its upgrades (applied at open, inside a write transaction)."""

from __future__ import annotations

import json
import sqlite3

from execguard.ledger._sql_util import LAST_LEAF_SQL, node_row
from execguard.protocol.logentry import receipt_leaf_hash
from execguard.protocol.merkle import CompactRange

__all__ = ["SCHEMA", "SCHEMA_VERSION", "upgrade"]

SCHEMA_VERSION = 6

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name),
    role TEXT NOT NULL, label TEXT, created_at TEXT NOT NULL, groups TEXT NOT NULL DEFAULT '',
    revoked_at TEXT);
CREATE TABLE IF NOT EXISTS signing_keys (
    key_id TEXT PRIMARY KEY, public_pem TEXT NOT NULL, status TEXT NOT NULL,
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bundles (
    tenant TEXT NOT NULL, version TEXT NOT NULL, files TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (tenant, version));
CREATE TABLE IF NOT EXISTS active_bundles (
    tenant TEXT PRIMARY KEY, version TEXT NOT NULL, activated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS log (
    tenant TEXT NOT NULL, idx INTEGER NOT NULL, kind TEXT NOT NULL, execution_id TEXT NOT NULL,
    receipt TEXT NOT NULL, receipt_hash TEXT NOT NULL, prev_hash TEXT, entry_hash TEXT NOT NULL,
    leaf_hash BLOB NOT NULL, PRIMARY KEY (tenant, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS log_by_execution ON log (tenant, execution_id, kind);
-- Keyed by the last leaf a node covers (``node_key``): the nodes one append creates are
-- neighbours, written at the table's end, instead of one page per tree level.
CREATE TABLE IF NOT EXISTS merkle_nodes (
    tenant TEXT NOT NULL, level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
    last_leaf INTEGER NOT NULL, PRIMARY KEY (tenant, last_leaf, level)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    tenant TEXT NOT NULL, size INTEGER NOT NULL, root BLOB NOT NULL, note TEXT NOT NULL,
    key_id TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (tenant, size)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS executions (
    execution_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, log_index INTEGER NOT NULL,
    surface TEXT NOT NULL, actor_id TEXT, decision TEXT NOT NULL, reason_code TEXT NOT NULL,
    policy_version TEXT, created_at TEXT NOT NULL, request_hash TEXT NOT NULL,
    request TEXT NOT NULL, response TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS executions_by_time ON executions (tenant, created_at);
CREATE TABLE IF NOT EXISTS outcomes (
    execution_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, log_index INTEGER NOT NULL,
    receipt TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL, key TEXT NOT NULL, request_hash TEXT NOT NULL, mode TEXT NOT NULL,
    execution_id TEXT NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (tenant, key));
CREATE TABLE IF NOT EXISTS reservations (
    execution_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, surface TEXT NOT NULL,
    actor TEXT NOT NULL, reserved_at REAL NOT NULL, expires_at REAL NOT NULL,
    consumed INTEGER NOT NULL DEFAULT 0, released INTEGER NOT NULL DEFAULT 0);
-- Covering: the limit facts read an actor's live reservations from the index alone.
CREATE INDEX IF NOT EXISTS reservations_live_by_actor ON reservations
    (tenant, surface, actor, reserved_at, released, consumed, expires_at, execution_id);
CREATE INDEX IF NOT EXISTS reservations_by_surface ON reservations (tenant, surface, reserved_at);
CREATE TABLE IF NOT EXISTS reservation_amounts (
    execution_id TEXT NOT NULL, field TEXT NOT NULL, units INTEGER NOT NULL,
    PRIMARY KEY (execution_id, field)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS approvals (
    execution_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, surface TEXT NOT NULL, actor_id TEXT,
    requester_key TEXT NOT NULL, approvers TEXT NOT NULL, quorum INTEGER NOT NULL,
    status TEXT NOT NULL, created_at TEXT NOT NULL, expires_at REAL NOT NULL,
    resolved_at TEXT);
CREATE INDEX IF NOT EXISTS approvals_by_status ON approvals (tenant, status, expires_at);
CREATE TABLE IF NOT EXISTS approval_votes (
    execution_id TEXT NOT NULL, voter_key TEXT NOT NULL, voter TEXT, vote TEXT NOT NULL,
    comment TEXT, created_at TEXT NOT NULL, log_index INTEGER NOT NULL,
    PRIMARY KEY (execution_id, voter_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shadow_bundles (
    tenant TEXT PRIMARY KEY, version TEXT NOT NULL, started_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shadow_disagreements (
    execution_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, surface TEXT NOT NULL,
    active_version TEXT, shadow_version TEXT NOT NULL, active_decision TEXT NOT NULL,
    active_reason TEXT NOT NULL, shadow_decision TEXT NOT NULL, shadow_reason TEXT NOT NULL,
    created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS shadow_by_version
    ON shadow_disagreements (tenant, shadow_version, created_at);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, url TEXT NOT NULL, secret TEXT NOT NULL,
    format TEXT NOT NULL, events TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS log_no_update BEFORE UPDATE ON log
    BEGIN SELECT RAISE(ABORT, 'the log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS log_no_delete BEFORE DELETE ON log
    BEGIN SELECT RAISE(ABORT, 'the log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS merkle_nodes_no_update BEFORE UPDATE ON merkle_nodes
    BEGIN SELECT RAISE(ABORT, 'the log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS merkle_nodes_no_delete BEFORE DELETE ON merkle_nodes
    BEGIN SELECT RAISE(ABORT, 'the log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
"""


def upgrade(conn: sqlite3.Connection, version: int) -> None:
    """Bring a database of ``version`` up to :data:`SCHEMA_VERSION` (before SCHEMA runs)."""
    if version < 2:
        _upgrade_1_to_2(conn)
    if version < 3:
        _upgrade_2_to_3(conn)
    if version < 4:
        # Version 4 replaces the per-actor index with a covering one (created by SCHEMA).
        conn.execute("DROP INDEX IF EXISTS reservations_by_actor")
    if version < 5:
        _upgrade_4_to_5(conn)
    if version < 6:
        _add_column(conn, "api_keys", "revoked_at", "TEXT")  # version 6: keys can be revoked


def _create_merkle_nodes(conn: sqlite3.Connection) -> None:
    """Create the Merkle node table as SCHEMA has it (for upgrades that fill it)."""
    for statement in SCHEMA.split(";\n"):
        if "TABLE IF NOT EXISTS merkle_nodes (" in statement:
            conn.execute(statement)


def _upgrade_1_to_2(conn: sqlite3.Connection) -> None:
    """Version 2 adds the Merkle tree: compute leaf and node hashes for the existing log."""
    conn.execute("ALTER TABLE log ADD COLUMN leaf_hash BLOB NOT NULL DEFAULT x''")
    conn.execute("DROP TRIGGER IF EXISTS log_no_update")
    _create_merkle_nodes(conn)
    tenants = [r[0] for r in conn.execute("SELECT DISTINCT tenant FROM log")]
    for tenant in tenants:
        tree = CompactRange()
        rows = conn.execute("SELECT idx, receipt FROM log WHERE tenant = ? ORDER BY idx",
                            (tenant,)).fetchall()
        for index, receipt in rows:
            leaf = receipt_leaf_hash(tenant, json.loads(receipt))
            conn.execute("UPDATE log SET leaf_hash = ? WHERE tenant = ? AND idx = ?",
                         (leaf, tenant, index))
            conn.executemany("INSERT INTO merkle_nodes VALUES (?, ?, ?, ?, ?)",
                             [node_row(tenant, node) for node in tree.append(leaf)])


def _upgrade_2_to_3(conn: sqlite3.Connection) -> None:
    """Version 3 gives API keys their approver groups."""
    _add_column(conn, "api_keys", "groups", "TEXT NOT NULL DEFAULT ''")


def _add_column(conn: sqlite3.Connection, table: str, column: str, definition: str) -> None:
    """Add a column unless the table has it (a database upgraded in one step from an older
    version may)."""
    if column not in [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


def _upgrade_4_to_5(conn: sqlite3.Connection) -> None:
    """Version 5 keys Merkle nodes by the last leaf they cover: the table is rebuilt once.

    A database upgraded from version 1 in the same step already has the new table."""
    columns = [row[1] for row in conn.execute("PRAGMA table_info(merkle_nodes)")]
    if "last_leaf" in columns:
        return
    for trigger in ("merkle_nodes_no_update", "merkle_nodes_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")  # SCHEMA creates them again
    conn.execute("ALTER TABLE merkle_nodes RENAME TO merkle_nodes_v4")
    _create_merkle_nodes(conn)
    conn.execute(f"INSERT INTO merkle_nodes SELECT tenant, level, idx, hash, {LAST_LEAF_SQL}"
                 " FROM merkle_nodes_v4")
    conn.execute("DROP TABLE merkle_nodes_v4")
