"""Approval requests and votes in the SQL ledger (the SQL; the rules live in sql.py).

Votes and resolutions are also signed receipts in the log: these rows are the
index the API reads, the log is the evidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from execguard.ledger._sql_util import dumps
from execguard.ledger.records import ApprovalRecord, ApprovalRequest, Vote, VoteRecord

if TYPE_CHECKING:
    from execguard.ledger._sql_admin import Connection

__all__ = [
    "add_webhook",
    "approval_row",
    "close_approval",
    "count_votes",
    "has_voted",
    "list_approvals",
    "list_webhooks",
    "open_approval",
    "record_vote",
    "resolve_execution",
]


def open_approval(conn: Connection, tenant: str, execution_id: str,
                  execution: Mapping[str, Any], request: ApprovalRequest, now: str) -> None:
    conn.execute("INSERT INTO approvals VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, NULL)",
                 (execution_id, tenant, execution["surface"], execution["actor_id"],
                  request.requester_key, request.approvers, request.quorum, now,
                  request.expires_at))


def approval_row(conn: Connection, tenant: str,
                 execution_id: str) -> tuple[str, int, float] | None:
    row = conn.execute("SELECT status, quorum, expires_at FROM approvals WHERE tenant = ?"
                       " AND execution_id = ?", (tenant, execution_id)).fetchone()
    return (row[0], int(row[1]), float(row[2])) if row else None


def has_voted(conn: Connection, execution_id: str, vote: Vote) -> bool:
    """Whether this vote's key, or another key of the same holder (its label: a rotated
    key, a second key), voted on the execution: a quorum counts people, not keys."""
    return conn.execute("SELECT 1 FROM approval_votes WHERE execution_id = ?"
                        " AND (voter_key = ? OR voter = ?)",
                        (execution_id, vote.voter_key, vote.voter)).fetchone() is not None


def record_vote(conn: Connection, execution_id: str, vote: Vote, now: str,
                log_index: int) -> None:
    conn.execute("INSERT INTO approval_votes VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (execution_id, vote.voter_key, vote.voter, vote.vote, vote.comment, now,
                  log_index))


def count_votes(conn: Connection, execution_id: str) -> tuple[int, int]:
    row = conn.execute("SELECT SUM(CASE WHEN vote = 'APPROVE' THEN 1 ELSE 0 END),"
                       " SUM(CASE WHEN vote = 'DENY' THEN 1 ELSE 0 END) FROM approval_votes"
                       " WHERE execution_id = ?", (execution_id,)).fetchone()
    return int(row[0] or 0), int(row[1] or 0)


def resolve_execution(conn: Connection, execution_id: str,
                      execution: Mapping[str, Any], response: Mapping[str, Any]) -> None:
    """The execution's current state becomes its resolution (both receipts stay in the log)."""
    conn.execute("UPDATE executions SET decision = ?, reason_code = ?, policy_version = ?,"
                 " response = ? WHERE execution_id = ?",
                 (execution["decision"], execution["reason_code"], execution["policy_version"],
                  dumps(response),
                  execution_id))


def close_approval(conn: Connection, execution_id: str, status: str, now: str) -> None:
    conn.execute("UPDATE approvals SET status = ?, resolved_at = ? WHERE execution_id = ?",
                 (status, now, execution_id))


def list_approvals(conn: Connection, tenant: str, status: str | None, limit: int,
                   execution_id: str | None = None) -> list[ApprovalRecord]:
    where, params = ["tenant = ?"], [tenant]
    if status is not None:
        where.append("status = ?")
        params.append(status)
    if execution_id is not None:
        where.append("execution_id = ?")
        params.append(execution_id)
    rows = conn.execute(
        "SELECT execution_id, tenant, surface, actor_id, requester_key, approvers, quorum,"
        f" status, created_at, expires_at, resolved_at FROM approvals WHERE {' AND '.join(where)}"
        " ORDER BY created_at DESC, execution_id LIMIT ?", (*params, limit)).fetchall()
    records = []
    for row in rows:
        votes = tuple(VoteRecord(*v) for v in conn.execute(
            "SELECT voter_key, voter, vote, comment, created_at, log_index FROM approval_votes"
            " WHERE execution_id = ? ORDER BY log_index", (row[0],)))
        records.append(ApprovalRecord(*row, votes=votes))
    return records


def add_webhook(conn: Connection, target: Any) -> None:
    conn.execute("INSERT INTO webhooks VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (target.id, target.tenant, target.url, target.secret, target.format,
                  ",".join(target.events), target.created_at))


def list_webhooks(conn: Connection, tenant: str) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT id, tenant, url, secret, format, events, created_at FROM"
                        " webhooks WHERE tenant = ? ORDER BY created_at, id",
                        (tenant,)).fetchall()
