"""The fact reader of the SQL ledger (stateful limits), inside the write transaction."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from execguard.ledger.records import Reservation

if TYPE_CHECKING:
    from execguard.ledger._sql_admin import Connection
    from execguard.ledger._sql_batch import PendingReservations

__all__ = ["TxnFacts"]


class TxnFacts:
    """Reads live reservations inside the current write transaction (a FactReader).

    ``pending`` holds the reservations of the batch that are not inserted yet
    (``BatchRows``): they are live by construction (new, not released, not
    expired) and are counted here exactly as the query counts stored ones.
    """

    _LIVE = ("r.tenant = ? AND r.surface = ? AND r.reserved_at > ? AND r.released = 0"
             " AND (r.consumed = 1 OR r.expires_at > ?)")

    def __init__(self, conn: Connection, tenant: str,
                 pending: PendingReservations | None = None) -> None:
        self.conn = conn
        self.tenant = tenant
        self.pending = pending or {}

    def _where(self, surface: str, actor: str | None, since: float,
               now: float) -> tuple[str, tuple[Any, ...]]:
        if actor is None:
            return self._LIVE, (self.tenant, surface, since, now)
        return self._LIVE + " AND r.actor = ?", (self.tenant, surface, since, now, actor)

    def _pending(self, surface: str, actor: str | None, since: float,
                 now: float) -> Iterator[Reservation]:
        by_actor = self.pending.get((self.tenant, surface), {})
        for group in by_actor.values() if actor is None else (by_actor.get(actor, ()),):
            for r in group:
                if r.reserved_at > since and r.expires_at > now:
                    yield r

    def count(self, surface: str, actor: str | None, since: float, now: float) -> int:
        where, params = self._where(surface, actor, since, now)
        stored = self.conn.execute(f"SELECT COUNT(*) FROM reservations r WHERE {where}",
                                   params).fetchone()[0]
        return int(stored) + sum(1 for _ in self._pending(surface, actor, since, now))

    def total(self, surface: str, actor: str | None, field: str, since: float,
              now: float) -> int:
        where, params = self._where(surface, actor, since, now)
        stored = self.conn.execute(
            "SELECT COALESCE(SUM(a.units), 0) FROM reservations r JOIN reservation_amounts a"
            f" ON a.execution_id = r.execution_id AND a.field = ? WHERE {where}",
            (field, *params)).fetchone()[0]
        return int(stored) + sum(r.amounts.get(field, 0)
                                 for r in self._pending(surface, actor, since, now))
