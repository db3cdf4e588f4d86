"""The life of a permit after the decision: consumed once, then an outcome.

A consumption is a signed receipt appended to the log, and so is every
refused attempt. Whether a permit was already used is decided by the ledger
from the log itself, inside its write lock (not from a status column), so 50
concurrent attempts give exactly one consumption, also across processes.
The consume receipt is durable before the answer goes out, so a gate never
runs an action whose consumption could be lost.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from execguard.ledger import (
    Committed,
    Conflicted,
    ExecutionRecord,
    GroupCommitter,
    PendingEntry,
    SQLStore,
)
from execguard.protocol.errors import Conflict, MalformedRequest, NotFound, PermitRefused
from execguard.protocol.outcome import PROTOCOL_VERSION, Outcome, format_timestamp, parse_timestamp
from execguard.protocol.receipt import seal_receipt
from execguard.protocol.request import describe, parse_json_object
from execguard.server.gateway import Caller, SigningKeys
from execguard.server.settings import Settings

__all__ = ["Permits"]

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")


class Permits:
    """Consumes permits and records outcomes, each as a signed log entry."""

    def __init__(self, settings: Settings, store: SQLStore, committer: GroupCommitter,
                 signers: SigningKeys, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.committer = committer
        self.signers = signers
        self.clock = clock

    def _record(self, caller: Caller, execution_id: str) -> ExecutionRecord:
        record = self.store.get_execution(caller.tenant, execution_id)
        if record is None:
            raise NotFound(f"no execution {execution_id!r} for this tenant")
        return record

    def _base_fields(self, record: ExecutionRecord, kind: str) -> dict[str, Any]:
        return {
            "receiptType": kind,
            "executionId": record.execution_id,
            "decisionReceiptHash": record.receipt["receiptHash"],
            "surface": record.surface,
            "actorId": record.actor_id,
            "timestamp": format_timestamp(datetime.fromtimestamp(self.clock(), UTC)),
            "protocolVersion": PROTOCOL_VERSION,
            "authorityId": self.settings.authority_id,
        }

    # -- consume -----------------------------------------------------------------------

    # What reads the store (the execution, the signing key) runs in a thread: a slow or
    # unreachable database holds up the request that reads it, not the event loop.

    async def consume(self, caller: Caller, execution_id: str, body: bytes) -> dict[str, Any]:
        """Use a permit once for the request it was issued for; raise PermitRefused otherwise."""
        data = parse_json_object(body)
        presented = data.get("requestHash")
        if not isinstance(presented, str) or not _HEX64.match(presented):
            raise MalformedRequest("requestHash", "64 lowercase hex digits (the request's hash)",
                                   describe(presented))
        record, entry = await asyncio.to_thread(self._consume_entry, caller, execution_id,
                                                presented)
        result = await self.committer.submit(entry)
        assert isinstance(result, Committed)
        receipt = result.receipt
        if receipt["consumeResult"] != "CONSUMED":
            raise PermitRefused(str(receipt["refusalReason"]), execution_id, receipt,
                                record.decision)
        return {"consumed": True, "executionId": execution_id, "receipt": receipt}

    def _consume_entry(self, caller: Caller, execution_id: str,
                       presented: str) -> tuple[ExecutionRecord, PendingEntry]:
        record = self._record(caller, execution_id)
        signer = self.signers.current()
        fields = {**self._base_fields(record, "consume"), "requestHash": presented}

        def sealed(result: str, reason: str | None) -> Callable[[int], dict[str, Any]]:
            return lambda index: seal_receipt(
                {**fields, "consumeResult": result, "refusalReason": reason, "logIndex": index},
                signer)

        refusal = self._refusal(record, presented)
        if refusal is not None:
            return record, PendingEntry(tenant=caller.tenant, kind="consume-refused",
                                        execution_id=execution_id, seal=sealed("REFUSED", refusal))
        return record, PendingEntry(tenant=caller.tenant, kind="consume",
                                    execution_id=execution_id, seal=sealed("CONSUMED", None),
                                    refuse=lambda reason: sealed("REFUSED", reason))

    def _refusal(self, record: ExecutionRecord, presented: str) -> str | None:
        """Why this attempt fails before single use is even asked, or None."""
        response = record.response
        if record.decision != Outcome.PERMIT.value or "execution_token" not in response:
            return "NOT_PERMITTED"  # including observe-mode "PERMIT"s, which carry no permit
        if presented != record.request_hash:
            return "REQUEST_MISMATCH"
        expires = response.get("token_expires_at")
        if not isinstance(expires, str) or \
                self.clock() >= parse_timestamp(expires).timestamp():
            return "EXPIRED"
        return None

    # -- outcomes ----------------------------------------------------------------------

    async def record_outcome(self, caller: Caller, execution_id: str,
                             body: bytes) -> dict[str, Any]:
        """Record SUCCESS/FAILURE of a permitted execution as a signed outcome receipt."""
        data = parse_json_object(body)
        result = data.get("result")
        if result not in ("SUCCESS", "FAILURE"):
            raise MalformedRequest("result", "'SUCCESS' or 'FAILURE'", describe(result))
        latency = data.get("latencyMs")
        if latency is not None and (isinstance(latency, bool) or not isinstance(latency, int)
                                    or latency < 0):
            raise MalformedRequest("latencyMs", "a whole number of milliseconds >= 0",
                                   describe(latency))
        digest = data.get("resultDigest")
        if digest is not None and (not isinstance(digest, str) or not 0 < len(digest) <= 256):
            raise MalformedRequest("resultDigest", "a string of 1 to 256 characters",
                                   describe(digest))
        entry = await asyncio.to_thread(self._outcome_entry, caller, execution_id, {
            "outcome": result, "latencyMs": latency, "resultDigest": digest})
        committed = await self.committer.submit(entry)
        if isinstance(committed, Conflicted):
            raise Conflict(f"an outcome is already recorded for execution {execution_id}")
        assert isinstance(committed, Committed)
        return {"executionId": execution_id, "outcome": result, "receipt": committed.receipt}

    def _outcome_entry(self, caller: Caller, execution_id: str,
                       reported: dict[str, Any]) -> PendingEntry:
        record = self._record(caller, execution_id)
        if record.decision != Outcome.PERMIT.value:
            raise Conflict(f"execution {execution_id} was not permitted ({record.decision}): "
                           "there is no execution to report an outcome for")
        signer = self.signers.current()
        fields = {**self._base_fields(record, "outcome"), **reported}

        def sealed(consumed: str | None) -> Callable[[int], dict[str, Any]]:
            return lambda index: seal_receipt(
                {**fields, "consumeReceiptHash": consumed, "logIndex": index}, signer)

        # The consumption is read inside the write lock (``seal_outcome``): one committed
        # a moment before, by this gateway or another, is named.
        return PendingEntry(tenant=caller.tenant, kind="outcome", execution_id=execution_id,
                            seal=sealed(None), seal_outcome=sealed)
