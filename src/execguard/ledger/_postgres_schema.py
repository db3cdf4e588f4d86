"""The PostgreSQL ledger's schema, as numbered migrations applied by ``execguard db migrate``.

Each migration runs once, in order, in one transaction with the schema
version it brings; a database is never left half-migrated. Never edit a
released migration: add the next one.
"""

from __future__ import annotations

from execguard.ledger._sql_util import LAST_LEAF_SQL

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tenants (name TEXT PRIMARY KEY, created_at TEXT NOT NULL);
CREATE TABLE api_keys (
    key_hash TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(name),
    role TEXT NOT NULL, label TEXT, created_at TEXT NOT NULL, groups TEXT NOT NULL DEFAULT '');
CREATE TABLE signing_keys (
    key_id TEXT PRIMARY KEY, public_pem TEXT NOT NULL, status TEXT NOT NULL,
    created_at TEXT NOT NULL);
CREATE TABLE bundles (
    tenant TEXT NOT NULL, version TEXT NOT NULL, files TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (tenant, version));
CREATE TABLE active_bundles (
    tenant TEXT PRIMARY KEY, version TEXT NOT NULL, activated_at TEXT NOT NULL);
CREATE TABLE log (
    tenant TEXT NOT NULL, idx BIGINT NOT NULL, kind TEXT NOT NULL, execution_id TEXT NOT NULL,
    receipt TEXT NOT NULL, receipt_hash TEXT NOT NULL, prev_hash TEXT, entry_hash TEXT NOT NULL,
    leaf_hash BYTEA NOT NULL, PRIMARY KEY (tenant, idx));
CREATE INDEX log_by_execution ON log (tenant, execution_id, kind);
CREATE TABLE merkle_nodes (
    tenant TEXT NOT NULL, level INTEGER NOT NULL, idx BIGINT NOT NULL, hash BYTEA NOT NULL,
    PRIMARY KEY (tenant, level, idx));
CREATE TABLE checkpoints (
    tenant TEXT NOT NULL, size BIGINT NOT NULL, root BYTEA NOT NULL, note TEXT NOT NULL,
    key_id TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (tenant, size));
CREATE TABLE executions (
    execution_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, log_index BIGINT NOT NULL,
    surface TEXT NOT NULL, actor_id TEXT, decision TEXT NOT NULL, reason_code TEXT NOT NULL,
    policy_version TEXT, created_at TEXT NOT NULL, request_hash TEXT NOT NULL,
    request TEXT NOT NULL, response TEXT NOT NULL);
CREATE INDEX executions_by_time ON executions (tenant, created_at);
CREATE INDEX executions_by_index ON executions (tenant, log_index);
CREATE TABLE outcomes (
    execution_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, log_index BIGINT NOT NULL,
    receipt TEXT NOT NULL);
CREATE TABLE idempotency (
    tenant TEXT NOT NULL, key TEXT NOT NULL, request_hash TEXT NOT NULL, mode TEXT NOT NULL,
    execution_id TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (tenant, key));
CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);
CREATE TABLE reservations (
    execution_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, surface TEXT NOT NULL,
    actor TEXT NOT NULL, reserved_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL, consumed INTEGER NOT NULL DEFAULT 0,
    released INTEGER NOT NULL DEFAULT 0);
CREATE INDEX reservations_by_actor ON reservations (tenant, surface, actor, reserved_at);
CREATE INDEX reservations_by_surface ON reservations (tenant, surface, reserved_at);
CREATE TABLE reservation_amounts (
    execution_id TEXT NOT NULL, field TEXT NOT NULL, units BIGINT NOT NULL,
    PRIMARY KEY (execution_id, field));
CREATE TABLE approvals (
    execution_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, surface TEXT NOT NULL, actor_id TEXT,
    requester_key TEXT NOT NULL, approvers TEXT NOT NULL, quorum INTEGER NOT NULL,
    status TEXT NOT NULL, created_at TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
    resolved_at TEXT);
CREATE INDEX approvals_by_status ON approvals (tenant, status, expires_at);
CREATE TABLE approval_votes (
    execution_id TEXT NOT NULL, voter_key TEXT NOT NULL, voter TEXT, vote TEXT NOT NULL,
    comment TEXT, created_at TEXT NOT NULL, log_index BIGINT NOT NULL,
    PRIMARY KEY (execution_id, voter_key));
CREATE TABLE shadow_bundles (
    tenant TEXT PRIMARY KEY, version TEXT NOT NULL, started_at TEXT NOT NULL);
CREATE TABLE shadow_disagreements (
    execution_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, surface TEXT NOT NULL,
    active_version TEXT, shadow_version TEXT NOT NULL, active_decision TEXT NOT NULL,
    active_reason TEXT NOT NULL, shadow_decision TEXT NOT NULL, shadow_reason TEXT NOT NULL,
    created_at TEXT NOT NULL);
CREATE INDEX shadow_by_version ON shadow_disagreements (tenant, shadow_version, created_at);
CREATE TABLE webhooks (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, url TEXT NOT NULL, secret TEXT NOT NULL,
    format TEXT NOT NULL, events TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE FUNCTION execguard_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;
CREATE TRIGGER log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON log
    FOR EACH STATEMENT EXECUTE FUNCTION execguard_append_only();
CREATE TRIGGER merkle_nodes_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON merkle_nodes
    FOR EACH STATEMENT EXECUTE FUNCTION execguard_append_only();
CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION execguard_append_only();
"""

#: The limit facts read an actor's live reservations from the index alone (index-only scan).
_V2 = """
CREATE INDEX reservations_live_by_actor ON reservations (tenant, surface, actor, reserved_at)
    INCLUDE (released, consumed, expires_at, execution_id);
DROP INDEX reservations_by_actor;
"""

#: Merkle nodes keyed by the last leaf they cover (``_sql_util.node_key``): the nodes of
#: one append are neighbours in the key, instead of one index page per tree level.
_V3 = f"""
ALTER TABLE merkle_nodes DISABLE TRIGGER merkle_nodes_append_only;
ALTER TABLE merkle_nodes ADD COLUMN last_leaf BIGINT;
UPDATE merkle_nodes SET last_leaf = {LAST_LEAF_SQL};
ALTER TABLE merkle_nodes ALTER COLUMN last_leaf SET NOT NULL;
ALTER TABLE merkle_nodes DROP CONSTRAINT merkle_nodes_pkey;
ALTER TABLE merkle_nodes ADD PRIMARY KEY (tenant, last_leaf, level);
ALTER TABLE merkle_nodes ENABLE TRIGGER merkle_nodes_append_only;
"""

#: API keys can be revoked (``execguard keys revoke``).
_V4 = "ALTER TABLE api_keys ADD COLUMN revoked_at TEXT;"

#: ``(version, SQL)`` in order; the database's version is the last one applied.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, _V1),
    (2, _V2),
    (3, _V3),
    (4, _V4),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]
