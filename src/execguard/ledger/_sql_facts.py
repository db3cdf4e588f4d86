"""The fact reader of the SQL ledger (stateful limits), inside the write transaction."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from execguard.ledger._sql_batch import MAX_PARAMETERS, FactsAhead, PendingReservations
from execguard.ledger.records import FactQuery, FactRead, PendingEntry, Reservation

if TYPE_CHECKING:
    from execguard.ledger._sql_admin import Connection

__all__ = ["TxnFacts", "read_facts_ahead"]

#: SQLite's default limit of SELECTs in one compound statement.
_MAX_COMPOUND = 500

_LIVE = ("r.tenant = ? AND r.surface = ? AND r.reserved_at > ? AND r.released = 0"
         " AND (r.consumed = 1 OR r.expires_at > ?)")


#: A sum is read as two sums, of each amount's high bits and of its low ``_HALF`` bits,
#: so that no total overflows 64 bits (SQLite refuses with "integer overflow"): each part
#: stays within 64 bits for up to 2**31 reservations, and :func:`_totals` adds them exactly.
_HALF = 32


@lru_cache(maxsize=256)
def _measure_sql(fields: tuple[str | None, ...], by_actor: bool) -> tuple[str, tuple[str, ...]]:
    """What one statement selects to answer every query (after ``SELECT``), and the
    fields its joins take as parameters, in order: a column per count and two per sum
    (:data:`_HALF`), each over the rows reserved after its query's start
    (``FILTER``), one join per summed field.

    The joins are on ``reservation_amounts``' key (execution id, field): at most one row
    each, so a reservation is still one row and ``COUNT(*)`` counts reservations. A
    reservation without the field adds nothing to that field's sum (NULL), and still
    counts."""
    joined = tuple(dict.fromkeys(name for name in fields if name is not None))
    aliases = {name: f"a{n}" for n, name in enumerate(joined)}
    columns: list[str] = []
    for name in fields:
        if name is None:
            columns.append("COUNT(*) FILTER (WHERE r.reserved_at > ?)")
            continue
        units = f"{aliases[name]}.units"
        columns += [f"COALESCE(SUM({part}) FILTER (WHERE r.reserved_at > ?), 0)"
                    for part in (f"{units} >> {_HALF}", f"{units} & {(1 << _HALF) - 1}")]
    joins = "".join(f" LEFT JOIN reservation_amounts {alias} ON {alias}.execution_id ="
                    f" r.execution_id AND {alias}.field = ?" for alias in aliases.values())
    where = _LIVE + (" AND r.actor = ?" if by_actor else "")
    return f"{', '.join(columns)} FROM reservations r{joins} WHERE {where}", joined


def _parameters(tenant: str, surface: str, actor: str | None, queries: Sequence[FactQuery],
                joined: tuple[str, ...], now: float) -> list[Any]:
    """The parameters of :func:`_measure_sql`'s statement for one read."""
    params: list[Any] = [query.since for query in queries
                         for _column in range(1 if query.field is None else 2)]
    params += [*joined, tenant, surface, min(query.since for query in queries), now]
    if actor is not None:
        params.append(actor)
    return params


def _totals(fields: Sequence[str | None], row: Sequence[Any]) -> list[int]:
    """A statement's columns as the answers to its queries: a count, or a sum's parts
    added up."""
    values = iter(row)
    return [int(next(values)) if field is None
            else (int(next(values)) << _HALF) + int(next(values)) for field in fields]


@lru_cache(maxsize=64)
def _ahead_sql(fields: tuple[str | None, ...], by_actor: bool, count: int) -> str:
    """``count`` reads of one shape in one statement, each row led by its read's number."""
    body, _ = _measure_sql(fields, by_actor)
    return " UNION ALL ".join(f"SELECT {n}, {body}" for n in range(count))


def read_facts_ahead(conn: Connection, entries: Sequence[PendingEntry]) -> FactsAhead:
    """Every read the entries will make (``PendingEntry.reads``), made now: one statement
    per shape of read (its fields, per actor or not) rather than one per read.

    Valid only while the stored reservations stay as they were read: the caller drops
    it before the batch inserts or updates any (``BatchRows.flush``)."""
    shapes: dict[tuple[tuple[str | None, ...], bool], list[tuple[str, FactRead]]] = {}
    for entry in entries:
        for read in entry.reads:
            if read.queries:
                shape = (tuple(query.field for query in read.queries), read.actor is not None)
                shapes.setdefault(shape, []).append((entry.tenant, read))
    ahead: FactsAhead = {}
    for (fields, by_actor), reads in shapes.items():
        _, joined = _measure_sql(fields, by_actor)
        columns = sum(1 if field is None else 2 for field in fields)
        per_read = columns + len(joined) + 4 + by_actor  # as _parameters builds
        per_statement = max(1, min(MAX_PARAMETERS // per_read, _MAX_COMPOUND))
        for start in range(0, len(reads), per_statement):
            chunk = reads[start:start + per_statement]
            params = [value for tenant, read in chunk for value in _parameters(
                tenant, read.surface, read.actor, read.queries, joined, read.now)]
            for row in conn.execute(_ahead_sql(fields, by_actor, len(chunk)),
                                    params).fetchall():
                ahead[chunk[row[0]]] = _totals(fields, row[1:])
    return ahead


class TxnFacts:
    """Reads live reservations inside the current write transaction (a FactReader).

    ``pending`` holds the reservations of the batch that are not inserted yet
    (``BatchRows``): they are live by construction (new, not released, not
    expired) and are counted here exactly as the query counts stored ones.
    """

    def __init__(self, conn: Connection, tenant: str,
                 pending: PendingReservations | None = None,
                 ahead: FactsAhead | None = None) -> None:
        self.conn = conn
        self.tenant = tenant
        self.pending = pending or {}
        #: Answers read ahead for the batch (:func:`read_facts_ahead`), over stored rows.
        self.ahead = ahead if ahead is not None else {}

    def _pending(self, surface: str, actor: str | None, since: float,
                 now: float) -> Iterator[Reservation]:
        by_actor = self.pending.get((self.tenant, surface), {})
        for group in by_actor.values() if actor is None else (by_actor.get(actor, ()),):
            for r in group:
                if r.reserved_at > since and r.expires_at > now:
                    yield r

    def measure(self, surface: str, actor: str | None, queries: Sequence[FactQuery],
                now: float) -> list[int]:
        """As ``FactReader.measure``: one statement for all the queries, or none when the
        batch read them ahead (then only the batch's own reservations are added here)."""
        if not queries:
            return []
        known = self.ahead.get((self.tenant, FactRead(surface, actor, tuple(queries), now))) \
            if self.ahead else None
        starts, fields = zip(*queries, strict=True)
        earliest = min(starts)
        if known is not None:
            answers = list(known)
        else:
            body, joined = _measure_sql(fields, actor is not None)
            params = _parameters(self.tenant, surface, actor, queries, joined, now)
            answers = _totals(fields, self.conn.execute("SELECT " + body, params).fetchone())
        for r in self._pending(surface, actor, earliest, now):
            for n, (since, field) in enumerate(queries):
                if r.reserved_at > since:
                    answers[n] += 1 if field is None else r.amounts.get(field, 0)
        return answers
