"""The fact reader of the SQL ledger (stateful limits), inside the write transaction."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from execguard.ledger.records import FactQuery, Reservation

if TYPE_CHECKING:
    from execguard.ledger._sql_admin import Connection
    from execguard.ledger._sql_batch import PendingReservations

__all__ = ["TxnFacts"]

_LIVE = ("r.tenant = ? AND r.surface = ? AND r.reserved_at > ? AND r.released = 0"
         " AND (r.consumed = 1 OR r.expires_at > ?)")


@lru_cache(maxsize=256)
def _measure_sql(fields: tuple[str | None, ...], by_actor: bool) -> tuple[str, tuple[str, ...]]:
    """One statement answering every query, and the fields its joins take as parameters,
    in order: a column per query, each counting or summing the rows reserved after its
    own start (``FILTER``), one join per summed field.

    The joins are on ``reservation_amounts``' key (execution id, field): at most one row
    each, so a reservation is still one row and ``COUNT(*)`` counts reservations. A
    reservation without the field adds nothing to that field's sum (NULL), and still
    counts."""
    joined = tuple(dict.fromkeys(name for name in fields if name is not None))
    aliases = {name: f"a{n}" for n, name in enumerate(joined)}
    columns = ["COUNT(*) FILTER (WHERE r.reserved_at > ?)" if name is None else
               f"COALESCE(SUM({aliases[name]}.units) FILTER (WHERE r.reserved_at > ?), 0)"
               for name in fields]
    joins = "".join(f" LEFT JOIN reservation_amounts {alias} ON {alias}.execution_id ="
                    f" r.execution_id AND {alias}.field = ?" for alias in aliases.values())
    where = _LIVE + (" AND r.actor = ?" if by_actor else "")
    return f"SELECT {', '.join(columns)} FROM reservations r{joins} WHERE {where}", joined


class TxnFacts:
    """Reads live reservations inside the current write transaction (a FactReader).

    ``pending`` holds the reservations of the batch that are not inserted yet
    (``BatchRows``): they are live by construction (new, not released, not
    expired) and are counted here exactly as the query counts stored ones.
    """

    def __init__(self, conn: Connection, tenant: str,
                 pending: PendingReservations | None = None) -> None:
        self.conn = conn
        self.tenant = tenant
        self.pending = pending or {}

    def _pending(self, surface: str, actor: str | None, since: float,
                 now: float) -> Iterator[Reservation]:
        by_actor = self.pending.get((self.tenant, surface), {})
        for group in by_actor.values() if actor is None else (by_actor.get(actor, ()),):
            for r in group:
                if r.reserved_at > since and r.expires_at > now:
                    yield r

    def measure(self, surface: str, actor: str | None, queries: Sequence[FactQuery],
                now: float) -> list[int]:
        """As ``FactReader.measure``: one statement for all the queries."""
        if not queries:
            return []
        starts, fields = zip(*queries, strict=True)
        earliest = min(starts)
        sql, joined = _measure_sql(fields, actor is not None)
        params: list[Any] = [*starts, *joined, self.tenant, surface, earliest, now]
        if actor is not None:
            params.append(actor)
        stored = self.conn.execute(sql, params).fetchone()
        answers = [int(value) for value in stored]
        for r in self._pending(surface, actor, earliest, now):
            for n, (since, field) in enumerate(queries):
                if r.reserved_at > since:
                    answers[n] += 1 if field is None else r.amounts.get(field, 0)
        return answers
