"""The decision path, wired: authenticate, plan (evaluate, seal), answer.

The append between plan and answer is the decision process's (``decision_worker.py``).
The gateway holds no policy logic (that is the arbiter's) and no storage
logic (the ledger's); it puts them in order and fails closed between them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from execguard.arbiter import CompiledBundle, PolicyBundle
from execguard.arbiter.registry import SurfaceSpec
from execguard.ledger import (
    ApiKeyRecord,
    CommitResult,
    Committed,
    ExecutionRecord,
    IdempotencyClaim,
    PendingEntry,
    Replayed,
    SQLStore,
)
from execguard.protocol.checkpoint import verifier_key
from execguard.protocol.errors import (
    AuthError,
    BundleInvalid,
    Forbidden,
    IdempotencyKeyReuse,
    MalformedRequest,
    NoSigningKey,
    NotFound,
    PolicyUnusable,
    ServiceUnavailable,
    UnknownSurface,
)
from execguard.protocol.ids import ENTROPY_BYTES, execution_id
from execguard.protocol.outcome import PROTOCOL_VERSION
from execguard.protocol.request import (
    ExecutionRequest,
    describe,
    normalized_request,
    parse_execution_request,
    parse_json_object,
    request_hash,
)
from execguard.protocol.signing import Signer, load_public_key_pem
from execguard.server.datadir import hash_api_key
from execguard.server.decisions import DecisionInput, fact_reads, facts_for, prepare_decision
from execguard.server.settings import Settings

__all__ = ["Caller", "Gateway", "SigningKeys", "explain_record"]

log = logging.getLogger("execguard.server")

#: How long an API key found in the store is trusted without asking it again: a key
#: revoked (``execguard keys revoke``, on any replica) stops working within this long.
KEY_CACHE_SECONDS = 5.0
#: How long a tenant's active and shadow policy versions are used without reading them
#: again. Another process (``execguard policy activate``, another replica on the same
#: database) may change them: its change takes effect on ``/execute`` within this long.
#: Approval resolutions and other reads use the version read now; an activation
#: through this gateway object takes effect at once (``forget_policy``).
POLICY_CACHE_SECONDS = 1.0


class SigningKeys(Protocol):
    """Where the active signing key comes from (it may change: rotation)."""

    def current(self) -> Signer:
        """The active key, or raise ``NoSigningKey``."""
        ...


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: its tenant and role."""

    tenant: str
    role: str
    key_hash: str
    label: str | None = None
    groups: tuple[str, ...] = ()


class Gateway:
    """Authenticates, plans decisions and answers them, explains what was decided.

    A decision is planned here (:meth:`plan`), appended by whoever owns the log's
    writes (the decision process: ``decision_worker.py``), and answered here
    (:meth:`answer`).
    """

    def __init__(self, settings: Settings, store: SQLStore, signers: SigningKeys, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.signers = signers
        self.clock = clock
        self._bundles: dict[tuple[str, str], tuple[PolicyBundle, CompiledBundle]] = {}
        self._bundles_lock = threading.Lock()
        #: (tenant, version) -> why that stored version does not load in this release.
        self._unusable: dict[tuple[str, str], str] = {}
        self._keys: dict[str, tuple[ApiKeyRecord, float]] = {}
        #: tenant -> (active version, shadow version, read until (monotonic)).
        self._versions: dict[str, tuple[str | None, str | None, float]] = {}
        #: ``notify(tenant, event, payload)``: approval events for webhooks (never raises).
        self.notify: Callable[[str, str, Mapping[str, Any]], None] = lambda *_: None
        #: ``on_authenticated(tenant)``: the request's log lines name the tenant from then on.
        self.on_authenticated: Callable[[str], None] = lambda _: None

    # -- authentication ----------------------------------------------------------------

    def authenticate(self, authorization: str | None, consumer: str | None) -> Caller:
        """Resolve ``Authorization: Bearer <key>``; ``X-Consumer`` must name the same tenant."""
        key_hash = _key_hash(authorization)
        record = self._cached_key(key_hash) or self._look_up_key(key_hash)
        return self._caller(record, consumer)

    async def authenticate_off_loop(self, authorization: str | None,
                                    consumer: str | None) -> Caller:
        """:meth:`authenticate` for the event loop: a key not in the cache is looked up in
        a thread, so a slow or unreachable database holds up this request only."""
        key_hash = _key_hash(authorization)
        record = self._cached_key(key_hash) or \
            await asyncio.to_thread(self._look_up_key, key_hash)
        return self._caller(record, consumer)

    def _cached_key(self, key_hash: str) -> ApiKeyRecord | None:
        cached = self._keys.get(key_hash)
        return cached[0] if cached is not None and time.monotonic() < cached[1] else None

    def _look_up_key(self, key_hash: str) -> ApiKeyRecord:
        found = self.store.lookup_api_key(key_hash)
        if found is None:
            raise AuthError("the API key is not valid")
        # A key changes only when it is revoked: a short cache saves a read per request.
        self._keys[key_hash] = (found, time.monotonic() + KEY_CACHE_SECONDS)
        return found

    def _caller(self, record: ApiKeyRecord, consumer: str | None) -> Caller:
        if consumer is not None and consumer.strip() and consumer.strip() != record.tenant:
            raise Forbidden("X-Consumer names a different tenant than the API key")
        self.on_authenticated(record.tenant)
        return Caller(record.tenant, record.role, record.key_hash, record.label, record.groups)

    # -- policy ------------------------------------------------------------------------

    def _policy_versions(self, tenant: str) -> tuple[str | None, str | None]:
        """The tenant's (active, shadow) versions, read at most every POLICY_CACHE_SECONDS.

        Two reads per decision otherwise, on the event loop. A version is a hash
        naming an immutable bundle, so a cached version never means a changed
        policy text, only a change that is at most that old.
        """
        now = time.monotonic()
        cached = self._versions.get(tenant)
        if cached is not None and now < cached[2]:
            return cached[0], cached[1]
        active = self.store.active_bundle_version(tenant)
        shadow = self.store.shadow_version(tenant)
        if active is not None:  # a tenant without a policy fails anyway: no hot path to save
            self._versions[tenant] = (active, shadow, now + POLICY_CACHE_SECONDS)
        return active, shadow

    def forget_policy(self, tenant: str | None = None) -> None:
        """Read the active and shadow versions again on the next request (after a change)."""
        if tenant is None:
            self._versions.clear()
        else:
            self._versions.pop(tenant, None)

    def active_bundle(self, tenant: str, *,
                      cached: bool = False) -> tuple[PolicyBundle, CompiledBundle]:
        """The tenant's active bundle, compiled once per version.

        ``cached``: the version may be up to POLICY_CACHE_SECONDS old (``/execute``
        only). Everything else (approval resolution above all: a hard deny activated
        meanwhile must apply) reads the version now.
        """
        version = self._policy_versions(tenant)[0] if cached else \
            self.store.active_bundle_version(tenant)
        if version is None:
            raise ServiceUnavailable(
                f"tenant {tenant!r} has no active policy bundle: push and activate one "
                "with 'execguard policy push' and 'execguard policy activate'")
        return self.compiled(tenant, version)

    def compiled(self, tenant: str, version: str) -> tuple[PolicyBundle, CompiledBundle]:
        """A stored version of the tenant's policy, compiled once."""
        cached = self._bundles.get((tenant, version))
        if cached is not None:
            return cached
        with self._bundles_lock:
            unusable = self._unusable.get((tenant, version))
            if unusable is not None:  # a version never changes: not read and parsed again
                raise PolicyUnusable(unusable)
            record = self.store.get_bundle(tenant, version)
            if record is None:  # activation requires a stored bundle
                raise ServiceUnavailable(f"policy version {version} is not stored")
            try:
                bundle = PolicyBundle.from_files(record.files)
            except BundleInvalid as exc:  # stored before this release's stricter rules
                why = (f"policy version {version[:12]} of tenant {tenant!r} does not load in "
                       f"this release ({exc}): activate a corrected bundle with 'execguard "
                       "policy push --activate'")
                self._unusable[(tenant, version)] = why
                log.warning("%s", why)  # once per version: it is not parsed again
                raise PolicyUnusable(why) from None
            compiled = (bundle, CompiledBundle(bundle))
            self._bundles[(tenant, version)] = compiled
            return compiled

    def _shadow_bundle(self, tenant: str, surface: str) -> CompiledBundle | None:
        """The tenant's shadow candidate, if it has one that knows the surface."""
        version = self._policy_versions(tenant)[1]
        if version is None:
            return None
        try:
            _, compiled = self.compiled(tenant, version)
        except ServiceUnavailable:
            # A comparison only: a candidate that does not load (one stored before this
            # release's stricter rules; compiled() says so once) never fails a decision.
            return None
        return compiled if compiled.registry.get(surface) is not None else None

    def _surface(self, bundle: PolicyBundle, surface: str) -> SurfaceSpec:
        spec = bundle.registry.get(surface)
        if spec is None:
            raise UnknownSurface(surface)
        return spec

    def _signer(self) -> Signer:
        return self.signers.current()

    # -- decisions ---------------------------------------------------------------------

    def plan(self, caller: Caller, request: ExecutionRequest) -> PendingEntry:
        """The log entry that decides ``request``: evaluated now, or, for a surface with
        stateful facts, inside the append's transaction (see decisions.py).

        Nothing is read before the append to learn whether the idempotency key was used:
        the append checks it inside its transaction (a live key gives the stored answer,
        or IdempotencyKeyReuse, before any stateful decision is taken), so a fresh key,
        the common case, costs no read.
        """
        tenant = caller.tenant
        bundle, compiled = self.active_bundle(tenant, cached=True)
        spec = self._surface(bundle, request.surface)
        signer = self._signer()
        observe = request.execution_mode == "observe" and spec.observe_allowed
        mode = "observe" if observe else "enforce"
        normalized = normalized_request(tenant, request, spec.sensitive)
        digest = request_hash(normalized)
        now = self.clock()
        minted = execution_id(int(now * 1000), os.urandom(ENTROPY_BYTES))
        given = DecisionInput(tenant, request, spec, compiled, normalized, digest, mode,
                              minted, now, self.settings.authority_id,
                              self.settings.token_ttl_seconds, requester_key=caller.key_hash,
                              shadow=self._shadow_bundle(tenant, spec.name))
        claim = None
        if request.idempotency_key is not None:
            claim = IdempotencyClaim(request.idempotency_key, digest, mode,
                                     now + self.settings.idempotency_ttl_seconds)
        if spec.facts:
            # Stateful: decided under the ledger's write lock (see decisions.py).
            return PendingEntry(tenant=tenant, kind="decision", execution_id=minted,
                                seal=_never, idempotency=claim,
                                decide=lambda reader: prepare_decision(given, signer, reader),
                                reads=fact_reads(spec, request, now)
                                if self.store.reads_facts_ahead else ())
        prepared = prepare_decision(given, signer, None)
        return PendingEntry(tenant=tenant, kind="decision", execution_id=minted,
                            seal=prepared.seal, execution=prepared.execution,
                            response=prepared.response, idempotency=claim,
                            reservation=prepared.reservation, approval=prepared.approval)

    def answer(self, tenant: str, request: ExecutionRequest,
               result: CommitResult) -> dict[str, Any]:
        """The response body for a planned decision once its append has committed."""
        if isinstance(result, Committed):
            assert result.response is not None
            answer = dict(result.response)
            if "approval" in answer:
                self.notify(tenant, "approval.requested", {
                    "executionId": answer["execution_id"], "decision": answer["decision"],
                    "reason": answer["reason"],
                    "approval": {**answer["approval"], "surface": request.surface,
                                 "actorId": request.actor_id}})
            return answer
        if isinstance(result, Replayed):
            return dict(result.record.response)
        raise IdempotencyKeyReuse(request.idempotency_key or "")

    # -- reading -----------------------------------------------------------------------

    def explain(self, caller: Caller, execution_id: str) -> dict[str, Any]:
        """The story of one execution, for ``GET /verify/{id}``."""
        record = self.store.get_execution(caller.tenant, execution_id)
        if record is None:
            raise NotFound(f"no execution {execution_id!r} for this tenant")
        story = self.store.execution_log(caller.tenant, execution_id)
        consumed = [e.receipt for e in story if e.kind == "consume"]
        approval = self.store.approval(caller.tenant, execution_id)
        return {**explain_record(record),
                "decisions": [e.receipt for e in story if e.kind == "decision"],
                "approvalVotes": [e.receipt for e in story if e.kind == "approval-vote"],
                "approvalStatus": approval.status if approval else None,
                "consumption": consumed[0] if consumed else None,
                "refusedConsumptions": [e.receipt for e in story
                                        if e.kind == "consume-refused"]}

    def surface(self, caller: Caller, name: str) -> dict[str, Any]:
        """What a gate needs to hash requests for a surface exactly as the gateway does."""
        bundle, _ = self.active_bundle(caller.tenant)
        spec = self._surface(bundle, name)
        return {"surface": spec.name, "policyVersion": bundle.version, "risk": spec.risk,
                "description": spec.description, "observeAllowed": spec.observe_allowed,
                "sensitive": sorted(spec.sensitive),
                "context": {f.name: {"type": f.type, "required": f.required}
                            for f in spec.context.values()}}

    def coach(self, caller: Caller, body: bytes) -> dict[str, Any]:
        """Dry-run evaluation: what would happen, with no receipt and no log entry."""
        data = parse_json_object(body)
        intent = data.get("intent")
        context = data.get("context", {})
        if not isinstance(context, dict):
            raise MalformedRequest("context", "a JSON object", describe(context))
        if isinstance(intent, str):
            intent = {"surface": intent}
        if not isinstance(intent, dict):
            raise MalformedRequest("intent", "a surface name or an object with 'surface'",
                                   describe(intent))
        surface = intent.get("surface")
        if not isinstance(surface, str):
            raise MalformedRequest("intent.surface", "a surface name", describe(surface))
        intent_context = intent.get("context")
        if intent_context is None:
            intent_context = {}
        if not isinstance(intent_context, dict):
            raise MalformedRequest("intent.context", "a JSON object", describe(intent_context))
        # The same validation as /execute, on the request the intent describes.
        request = parse_execution_request(json.dumps({
            **{k: intent[k] for k in ("action", "actorId", "signals", "subjectDigest")
               if k in intent},
            "surface": surface, "context": {**intent_context, **context},
        }).encode("utf-8"))
        bundle, compiled = self.active_bundle(caller.tenant)
        spec = self._surface(bundle, surface)
        facts = facts_for(spec, request, self.clock(), self.store.fact_reader(caller.tenant))
        evaluation = compiled.evaluate(request, facts)
        return {
            "likely_outcome": evaluation.outcome.value,
            "likelyOutcome": evaluation.outcome.value,
            "confidence": 1.0,
            "reason": evaluation.reason,
            "reasonCode": evaluation.reason_code,
            "determiningPolicies": list(evaluation.determining_policies),
            "policyVersion": evaluation.policy_version,
            "alternatives": [],
            "advisoryOnly": True,
        }

    def keys_document(self) -> dict[str, Any]:
        """The published keys; :class:`NoSigningKey` when none is published."""
        keys = self.store.signing_keys()
        if not keys:
            raise NoSigningKey("no signing key is published")
        return {
            "protocol": PROTOCOL_VERSION,
            "authority": self.settings.authority_id,
            "keys": [{"keyId": k.key_id, "algorithm": "Ed25519", "publicKeyPem": k.public_pem,
                      "status": k.status,
                      "noteVerifierKey": verifier_key(self.settings.authority_id,
                                                      load_public_key_pem(k.public_pem))}
                     for k in keys],
        }


def _key_hash(authorization: str | None) -> str:
    """The hash of the API key in an ``Authorization`` header; AuthError if there is none."""
    if not authorization:
        raise AuthError("missing Authorization header: send 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthError("the Authorization header must be 'Bearer <api key>'")
    return hash_api_key(key.strip())


def _never(index: int) -> dict[str, Any]:  # pragma: no cover - replaced by ``decide``
    raise AssertionError("a stateful decision is sealed by its decide callback")


def explain_record(record: ExecutionRecord) -> dict[str, Any]:
    """A decision's summary, receipt and outcome, as ``/verify/{id}`` shows it."""
    response = record.response
    return {
        "executionId": record.execution_id,
        "summary": response.get("summary"),
        "decision": record.decision,
        "surface": record.surface,
        "actorId": record.actor_id,
        "reason": response.get("reason"),
        "reasonCode": record.reason_code,
        "policyVersion": record.policy_version,
        "determiningPolicies": response.get("determiningPolicies", []),
        "executionMode": response.get("executionMode"),
        "wouldDecision": response.get("would_decision"),
        # The current receipt's (a resolved approval's, not its ESCALATE's).
        "timestamp": record.receipt["timestamp"],
        "logIndex": record.receipt["logIndex"],
        "requestHash": record.request_hash,
        "receipt": record.receipt,
        "outcome": record.outcome_receipt,
    }
