"""Prometheus metrics: a small thread-safe registry and ExecGuard's metric set.

``GET /metrics`` answers in the Prometheus text format 0.0.4. It needs no API
key and holds counts only: surface names, tenant names, decisions and error
codes as labels, never request contents.

What is counted, and where it is observed:

- ``execguard_decisions_total{decision, surface, mode}``: decisions taken on
  ``/execute`` and recorded in the log, counted when their batch commits. An
  idempotent replay is not counted again; an approval's later resolution is not
  an ``/execute`` decision (see ``execguard_approval_resolutions_total``).
  ``decision`` is the decision answered: an observe-mode request is always
  answered ``PERMIT`` (without a permit), so it counts as ``decision="PERMIT",
  mode="observe"`` whatever its policy would have decided (that is in its receipt
  as ``wouldDecision``); ``mode="enforce"`` for everything else.
- ``execguard_decision_latency_seconds``: time spent on each ``POST /execute``
  request, whatever its status.
- ``execguard_group_commit_batch_size`` / ``execguard_group_commit_batches_total``:
  entries per committed ledger transaction, and how many committed.
- ``execguard_log_entries{tenant}`` / ``execguard_approvals_pending{tenant}``:
  read from the store when scraped.
- ``execguard_fail_closed_total{cause}``: 503 answers of the error handler
  (``cause`` is their error code: ``storage_unavailable``, ``keys_unavailable``,
  ``service_unavailable``) and 500s (``cause="internal_error"``).
- ``execguard_permits_consumed_total`` / ``execguard_permit_refusals_total{reason}``:
  consume attempts as recorded in the log (``reason`` is the refusal reason, one of
  ``PermitRefused.CODES``).
- ``execguard_approval_resolutions_total{decision, surface}``: escalations resolved
  by their approval step (a vote, or the expiry), by the decision recorded then.
"""

from __future__ import annotations

import abc
import logging
import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from execguard.ledger import Committed, Conflicted
from execguard.protocol.errors import PermitRefused

if TYPE_CHECKING:
    from execguard.ledger import CommitResult, LedgerStore, PendingEntry

__all__ = ["CONTENT_TYPE", "BatchSummary", "Counter", "Gauge", "Histogram", "Metrics", "Registry",
           "summarize_batch"]

log = logging.getLogger("execguard.server")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds, for a handler that normally answers in 1 ms to 1 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Entries per transaction, up to the writer's default ``max_batch`` of 256.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: The pending-approvals gauge counts at most this many per tenant.
PENDING_APPROVALS_CAP = 10_000

_Labels = tuple[str, ...]
_F = TypeVar("_F", bound="_Family")
_Sample = tuple[str, Mapping[str, str], float]


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it (``+Inf``, ``-Inf``, ``NaN``)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value)}"
    return repr(float(value))


def escape_label_value(value: str) -> str:
    """Escape ``\\``, ``"`` and newlines, as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _sample_line(name: str, labels: Mapping[str, str], value: float) -> str:
    if labels:
        inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {format_value(value)}"
    return f"{name} {format_value(value)}"


class _Family(abc.ABC):
    """A named metric with fixed label names; one child value per label set."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, str]) -> _Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    @abc.abstractmethod
    def samples(self) -> Iterable[_Sample]:
        """The current samples: (sample name, labels, value)."""

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}",
                 f"# TYPE {self.name} {self.kind}"]
        lines += [_sample_line(name, labels, value) for name, labels, value in self.samples()]
        return "\n".join(lines) + "\n"


class Counter(_Family):
    """A value that only goes up."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[_Labels, float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` (>= 0) to the child with these labels."""
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        """The child's current value (0 if never incremented)."""
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[_Sample]:
        with self._lock:
            values = sorted(self._values.items())
        return [(self.name, dict(zip(self.labelnames, k, strict=True)), v) for k, v in values]


class Gauge(_Family):
    """A value read when scraped: ``collect`` returns (labels, value) pairs."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str],
                 collect: Callable[[], Iterable[tuple[Mapping[str, str], float]]]) -> None:
        super().__init__(name, help_text, labelnames)
        self._collect = collect

    def samples(self) -> Iterable[_Sample]:
        found = [(self._key(labels), value) for labels, value in self._collect()]
        return [(self.name, dict(zip(self.labelnames, k, strict=True)), v)
                for k, v in sorted(found)]


class Histogram(_Family):
    """Observations counted into cumulative ``le`` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float],
                 labelnames: Sequence[str] = ()) -> None:
        if "le" in labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        #: Per label set: [count per bucket (last: above every bound)], sum, count.
        self._children: dict[_Labels, tuple[list[int], list[float]]] = {}
        if not labelnames:
            self._child(())

    def _child(self, key: _Labels) -> tuple[list[int], list[float]]:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = ([0] * (len(self.buckets) + 1), [0.0, 0.0])
        return child

    def observe(self, value: float, **labels: str) -> None:
        """Count one observation."""
        key = self._key(labels)
        index = bisect_left(self.buckets, value)  # the first bound with value <= bound
        with self._lock:
            counts, totals = self._child(key)
            counts[index] += 1
            totals[0] += value
            totals[1] += 1

    def samples(self) -> Iterable[_Sample]:
        with self._lock:
            children = sorted((k, (list(c), list(t))) for k, (c, t) in self._children.items())
        out: list[_Sample] = []
        for key, (counts, (total, count)) in children:
            labels = dict(zip(self.labelnames, key, strict=True))
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                le = "+Inf" if math.isinf(bound) else repr(bound)
                out.append((f"{self.name}_bucket", {**labels, "le": le}, running))
            out.append((f"{self.name}_sum", labels, total))
            out.append((f"{self.name}_count", labels, count))
        return out


class Registry:
    """Metric families, rendered in the order they were registered."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def register(self, family: _F) -> _F:
        """Add a family (names are unique) and return it."""
        if family.name in self._families:
            raise ValueError(f"metric {family.name} is already registered")
        self._families[family.name] = family
        return family

    def render(self) -> str:
        """The whole exposition. A family whose scrape-time read fails is left out."""
        parts = []
        for family in self._families.values():
            try:
                parts.append(family.render())
            except Exception as exc:  # one unreadable gauge must not hide the counters
                log.warning("metric %s not collected: %s", family.name, exc)
        return "".join(parts)


class BatchSummary(NamedTuple):
    """What the metrics take from one committed transaction (plain data: it crosses
    from the decision process to the server as JSON)."""

    #: Log entries appended (an idempotent replay or a conflict rides in the
    #: transaction, its key is checked there, but appends nothing).
    appended: int
    #: (decision, surface, mode) of each decision appended.
    decisions: list[tuple[str, str, str]]
    #: Permits consumed, and the reason of each refused consumption.
    consumed: int
    refusals: list[str]
    #: (decision, surface) of each escalation resolved: approved, denied or expired.
    resolutions: list[tuple[str, str]]


def summarize_batch(entries: Sequence[PendingEntry],
                    results: Sequence[CommitResult]) -> BatchSummary:
    """The metrics' view of one committed transaction."""
    summary = BatchSummary(0, [], 0, [], [])
    appended = consumed = 0
    for entry, result in zip(entries, results, strict=False):
        resolution = _resolution(entry, result)
        if resolution is not None:
            appended += 1  # its own entry; the vote, if any, is counted below
            summary.resolutions.append((str(resolution.get("decision")),
                                        str(resolution.get("surface"))))
        if not isinstance(result, Committed):
            continue  # a replay or a conflict: nothing new was decided or consumed
        appended += entry.kind != "approval-expire"  # the expiry is its resolution
        if entry.kind == "decision" and result.response is not None:
            answer = result.response
            summary.decisions.append((str(answer.get("decision")), str(answer.get("surface")),
                                      str(answer.get("executionMode") or "enforce")))
        elif entry.kind in ("consume", "consume-refused"):
            if result.receipt.get("consumeResult") == "CONSUMED":
                consumed += 1
            else:
                summary.refusals.append(str(result.receipt.get("refusalReason")))
    return summary._replace(appended=appended, consumed=consumed)


def _resolution(entry: PendingEntry, result: CommitResult) -> Mapping[str, Any] | None:
    """The stored answer of the escalation's resolution this approval step wrote, if any."""
    if entry.kind not in ("approval-vote", "approval-expire"):
        return None
    if isinstance(result, Committed):
        return result.response
    return result.resolution if isinstance(result, Conflicted) else None


class Metrics:
    """ExecGuard's metrics. One per app; observed through small hooks (see module doc)."""

    def __init__(self, store: LedgerStore | None = None) -> None:
        self.store = store
        self.registry = Registry()
        add = self.registry.register
        self.decisions = add(Counter(
            "execguard_decisions_total",
            "Decisions taken on /execute and recorded in the log. decision is the answered "
            "decision (observe mode answers PERMIT, with mode=\"observe\").",
            ("decision", "surface", "mode")))
        self.decision_latency = add(Histogram(
            "execguard_decision_latency_seconds",
            "Time spent on each POST /execute request, whatever its status.",
            LATENCY_BUCKETS))
        self.batch_size = add(Histogram(
            "execguard_group_commit_batch_size",
            "Log entries per committed ledger transaction.", BATCH_BUCKETS))
        self.batches = add(Counter(
            "execguard_group_commit_batches_total", "Committed ledger transactions."))
        add(Gauge("execguard_log_entries", "Entries in the tenant's append-only log.",
                  ("tenant",), self._log_entries))
        add(Gauge("execguard_approvals_pending",
                  f"Pending approval requests of the tenant (counted up to "
                  f"{PENDING_APPROVALS_CAP}).", ("tenant",), self._approvals_pending))
        self.fail_closed = add(Counter(
            "execguard_fail_closed_total",
            "Requests refused because the service could not act durably (503, cause is the "
            "error code) or failed unexpectedly (500, cause=\"internal_error\").", ("cause",)))
        self.permits_consumed = add(Counter(
            "execguard_permits_consumed_total", "Permits consumed (each at most once)."))
        self.permit_refusals = add(Counter(
            "execguard_permit_refusals_total",
            "Consume attempts refused, by refusal reason.", ("reason",)))
        self.resolutions = add(Counter(
            "execguard_approval_resolutions_total",
            "Escalations resolved by their approval step, by the decision it came to: "
            "PERMIT (approved), DENY (denied, or a forbid that fired meanwhile), SILENCE "
            "(expired, or not evaluable again).", ("decision", "surface")))
        # Known label values start at 0, so rate() sees their first increment.
        for cause in ("storage_unavailable", "keys_unavailable", "service_unavailable",
                      "internal_error"):
            self.fail_closed.inc(0, cause=cause)
        for reason in PermitRefused.CODES:
            self.permit_refusals.inc(0, reason=reason)

    # -- scrape-time gauges ------------------------------------------------------------

    def _log_entries(self) -> list[tuple[Mapping[str, str], float]]:
        if self.store is None:
            return []
        return [({"tenant": t}, self.store.log_size(t)) for t in self.store.tenants()]

    def _approvals_pending(self) -> list[tuple[Mapping[str, str], float]]:
        if self.store is None:
            return []
        return [({"tenant": t}, len(self.store.approvals(t, "pending", PENDING_APPROVALS_CAP)))
                for t in self.store.tenants()]

    # -- hooks -------------------------------------------------------------------------

    def observe_batch(self, entries: Sequence[PendingEntry],
                      results: Sequence[CommitResult]) -> None:
        """A committed ledger transaction (called on the writer thread; cheap)."""
        self.observe_summary(summarize_batch(entries, results))

    def observe_summary(self, summary: BatchSummary) -> None:
        """A committed ledger transaction, summarized (here or in the decision process)."""
        self.batches.inc()
        self.batch_size.observe(summary.appended)
        for decision, surface, mode in summary.decisions:
            self.decisions.inc(decision=decision, surface=surface, mode=mode)
        if summary.consumed:
            self.permits_consumed.inc(summary.consumed)
        for reason in summary.refusals:
            self.permit_refusals.inc(reason=reason)
        for decision, surface in summary.resolutions:
            self.resolutions.inc(decision=decision, surface=surface)

    def observe_request(self, method: str, path: str, status: int, seconds: float,
                        error_code: str | None) -> None:
        """One HTTP request, after its answer (called by the request-log middleware)."""
        if method == "POST" and path == "/execute":
            self.decision_latency.observe(seconds)
        if status == 503 and error_code:
            self.fail_closed.inc(cause=error_code)
        elif status >= 500 and status != 503:
            self.fail_closed.inc(cause="internal_error")

    def render(self) -> str:
        """The exposition for ``GET /metrics`` (reads the store for the gauges)."""
        return self.registry.render()
