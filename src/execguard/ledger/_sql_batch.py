"""The rows one batch appends, written together: one INSERT per table, not one per row.

Every statement is a call into the database driver, and on SQLite each call
releases and retakes the GIL: under load that hands the interpreter to the
event loop and back (two context switches) for a few microseconds of work, so
a decision's six inserts cost more in switching than in SQL. Buffered, a batch
of N decisions writes each table in one multi-row INSERT.

The rows stay inside the batch's write transaction either way: nothing is
committed, and nothing acknowledged, before :meth:`BatchRows.flush` has run
and the transaction has committed. A read that could need a buffered row
flushes first (:meth:`BatchRows.flush` is cheap when empty); the fact reads do
not need to, because :class:`~execguard.ledger._sql_facts.TxnFacts` counts the
batch's buffered reservations itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from execguard.ledger.records import FactRead, Reservation

if TYPE_CHECKING:
    from execguard.ledger._sql_admin import Connection

__all__ = ["BatchRows", "FactsAhead", "PendingReservations"]

#: A batch's reservations not inserted yet: (tenant, surface) -> actor -> reservations.
PendingReservations = dict[tuple[str, str], dict[str, list[Reservation]]]
#: Fact reads made ahead for a batch: (tenant, read) -> each query's answer over stored rows.
FactsAhead = dict[tuple[str, FactRead], list[int]]

#: Each table's INSERT: its leading clause, one row's parameter markers, and a trailer.
_INSERTS: dict[str, tuple[str, str, str]] = {
    "log": ("INSERT INTO log VALUES ", "(?, ?, ?, ?, ?, ?, ?, ?, ?)", ""),
    "merkle_nodes": ("INSERT INTO merkle_nodes VALUES ", "(?, ?, ?, ?, ?)", ""),
    "executions": ("INSERT INTO executions VALUES ",
                   "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", ""),
    "reservations": ("INSERT INTO reservations VALUES ", "(?, ?, ?, ?, ?, ?, 0, 0)", ""),
    "reservation_amounts": ("INSERT INTO reservation_amounts VALUES ", "(?, ?, ?)", ""),
    "idempotency": ("INSERT INTO idempotency VALUES ", "(?, ?, ?, ?, ?, ?)",
                    " ON CONFLICT (tenant, key) DO UPDATE SET request_hash ="
                    " excluded.request_hash, mode = excluded.mode, execution_id ="
                    " excluded.execution_id, expires_at = excluded.expires_at"),
}

#: Parameters per statement, within SQLite's smallest limit (999) and PostgreSQL's.
MAX_PARAMETERS = 999


class BatchRows:
    """Rows waiting to be inserted, in table order, plus the batch's new reservations
    and the fact answers read ahead over the stored ones."""

    def __init__(self) -> None:
        self._rows: dict[str, list[tuple[Any, ...]]] = {table: [] for table in _INSERTS}
        #: Each PERMIT's reservation in the batch, by (tenant, surface) and actor: what
        #: the fact reads add to the stored ones (an actor's, without a scan of the batch).
        self.reservations: PendingReservations = {}
        #: Fact answers read at the batch's start (``_sql_facts.read_facts_ahead``): with
        #: ``reservations``, the live state, until a flush stores those (or lets the
        #: caller update stored ones) and both are emptied.
        self.facts_ahead: FactsAhead = {}

    def add(self, table: str, row: tuple[Any, ...]) -> None:
        """Queue one row of ``table`` (one of the tables above)."""
        self._rows[table].append(row)

    def reserve(self, tenant: str, execution_id: str, reservation: Reservation) -> None:
        """Queue a PERMIT's reservation and its amounts."""
        self.add("reservations", (execution_id, tenant, reservation.surface, reservation.actor,
                                  reservation.reserved_at, reservation.expires_at))
        for name, units in reservation.amounts.items():
            self.add("reservation_amounts", (execution_id, name, units))
        self.reservations.setdefault((tenant, reservation.surface), {}) \
            .setdefault(reservation.actor, []).append(reservation)

    def flush(self, conn: Connection) -> None:
        """Insert everything queued (one statement per table and chunk) and forget it."""
        for table, rows in self._rows.items():
            if not rows:
                continue
            head, one, tail = _INSERTS[table]
            per_statement = max(1, MAX_PARAMETERS // len(rows[0]))
            for start in range(0, len(rows), per_statement):
                chunk = rows[start:start + per_statement]
                conn.execute(head + ", ".join([one] * len(chunk)) + tail,
                             [value for row in chunk for value in row])
            rows.clear()
        self.reservations.clear()
        self.facts_ahead.clear()
