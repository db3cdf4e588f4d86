"""Reservations and the fact reader of the SQL ledger (stateful limits)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from execguard.ledger.records import Reservation

if TYPE_CHECKING:
    from execguard.ledger._sql_admin import Connection

__all__ = ["TxnFacts", "reserve"]


def reserve(conn: Connection, tenant: str, execution_id: str,
             reservation: Reservation) -> None:
    conn.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?, 0, 0)",
                 (execution_id, tenant, reservation.surface, reservation.actor,
                  reservation.reserved_at, reservation.expires_at))
    conn.executemany("INSERT INTO reservation_amounts VALUES (?, ?, ?)",
                     [(execution_id, name, units) for name, units in reservation.amounts.items()])


class TxnFacts:
    """Reads live reservations inside the current write transaction (a FactReader)."""

    _LIVE = ("r.tenant = ? AND r.surface = ? AND r.reserved_at > ? AND r.released = 0"
             " AND (r.consumed = 1 OR r.expires_at > ?)")

    def __init__(self, conn: Connection, tenant: str) -> None:
        self.conn = conn
        self.tenant = tenant

    def _where(self, surface: str, actor: str | None, since: float,
               now: float) -> tuple[str, tuple[Any, ...]]:
        if actor is None:
            return self._LIVE, (self.tenant, surface, since, now)
        return self._LIVE + " AND r.actor = ?", (self.tenant, surface, since, now, actor)

    def count(self, surface: str, actor: str | None, since: float, now: float) -> int:
        where, params = self._where(surface, actor, since, now)
        return int(self.conn.execute(f"SELECT COUNT(*) FROM reservations r WHERE {where}",
                                     params).fetchone()[0])

    def total(self, surface: str, actor: str | None, field: str, since: float,
              now: float) -> int:
        where, params = self._where(surface, actor, since, now)
        return int(self.conn.execute(
            "SELECT COALESCE(SUM(a.units), 0) FROM reservations r JOIN reservation_amounts a"
            f" ON a.execution_id = r.execution_id AND a.field = ? WHERE {where}",
            (field, *params)).fetchone()[0])


