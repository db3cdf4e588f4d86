"""Real loopback services for the gate SDK tests.

- :class:`Upstream`: the service a guarded function calls (a payments API); it counts
  every request it receives, so a test can tell whether the action really ran.
- :class:`FakeGateway`: an impostor gateway. It builds its answers with ExecGuard's own
  protocol code (request hash, sealed receipts, EdDSA execution tokens) under a key of its
  own, so by default they are internally consistent; a test then spoils one detail.
- :class:`BlackHole`: accepts TCP connections and never answers; :class:`Trickler` answers
  one byte at a time.

All three are stdlib servers in daemon threads on free 127.0.0.1 ports.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from execguard.protocol.outcome import format_timestamp
from execguard.protocol.receipt import seal_receipt
from execguard.protocol.request import normalized_request, parse_execution_request, request_hash
from execguard.protocol.signing import Signer
from execguard.protocol.token import TOKEN_TYPE, execution_token_claims, issue_execution_token

__all__ = ["BlackHole", "FakeGateway", "Raw", "Trickler", "Upstream", "keys_document",
           "permit_header"]


@dataclass(frozen=True)
class Raw:
    """An answer sent as is: status, body bytes, content type."""

    status: int
    body: bytes
    content_type: str = "application/json"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes: without TCP_NODELAY, Nagle and delayed ACKs
    # hold the body back for ~40 ms on keep-alive connections.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, answer: Any) -> None:
        raw = answer if isinstance(answer, Raw) else Raw(200, json.dumps(answer).encode())
        self.send_response(raw.status)
        self.send_header("Content-Type", raw.content_type)
        self.send_header("Content-Length", str(len(raw.body)))
        self.end_headers()
        self.wfile.write(raw.body)


class _Service:
    """A ThreadingHTTPServer on a free loopback port, served from a daemon thread."""

    def __init__(self, handler: type[_Handler]) -> None:
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.service = self  # type: ignore[attr-defined]
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# -- the upstream ----------------------------------------------------------------------


class _UpstreamHandler(_Handler):
    def do_POST(self) -> None:
        upstream: Upstream = self.server.service  # type: ignore[attr-defined]
        body = json.loads(self._body() or b"null")
        with upstream.lock:
            upstream.calls.append((self.path, body))
            number = len(upstream.calls)
        self._send({"id": f"{self.path.strip('/')}-{number}", "received": body})


class Upstream(_Service):
    """The real service behind a guarded function; ``count`` is how often it was called."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, Any]] = []
        super().__init__(_UpstreamHandler)

    def count(self, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for p, _ in self.calls if path is None or p == path)


# -- the fake gateway ------------------------------------------------------------------


def keys_document(*signers: Signer, authority: str = "execguard") -> dict[str, Any]:
    """A keys document (PROTOCOL.md §4) publishing these keys."""
    return {"protocol": "execguard/1", "authority": authority,
            "keys": [{"keyId": s.key_id, "algorithm": "Ed25519", "publicKeyPem": s.public_pem,
                      "status": "active"} for s in signers]}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


#: A spoiler receives the fake and the answer it would give, and returns what to send.
Spoiler = Callable[["FakeGateway", dict[str, Any]], Any]


class _FakeGatewayHandler(_Handler):
    def do_GET(self) -> None:
        fake: FakeGateway = self.server.service  # type: ignore[attr-defined]
        fake.record("GET", self.path)
        if self.path == "/.well-known/trigguard/keys.json":
            self._send(fake.keys_served)
        elif self.path.startswith("/v1/surfaces/"):
            self._send({"surface": self.path.rsplit("/", 1)[1],
                        "sensitive": sorted(fake.sensitive)})
        else:
            self._send(Raw(404, b'{"error":"not_found"}'))

    def do_POST(self) -> None:
        fake: FakeGateway = self.server.service  # type: ignore[attr-defined]
        body = self._body()
        fake.record("POST", self.path)
        parts = self.path.strip("/").split("/")
        route = {"execute": "execute", "v1": "consume", "executions": "outcome"}.get(parts[0])
        if route in fake.hang_on:
            fake.release.wait(30)  # an answer that never comes (until the test ends)
            self.close_connection = True
        elif route == "execute":
            answer = fake.decide(body, self.headers.get("Idempotency-Key"))
            self._send(fake.spoil_execute(fake, answer) if fake.spoil_execute else answer)
        elif route == "consume" and parts[-1] == "consume":
            answer = fake.consume(parts[2], json.loads(body))
            self._send(fake.spoil_consume(fake, answer) if fake.spoil_consume else answer)
        elif route == "outcome" and parts[-1] == "outcome":
            self._send(fake.outcome(parts[1], json.loads(body)))
        else:
            self._send(Raw(404, b'{"error":"not_found"}'))


class FakeGateway(_Service):
    """An impostor gateway whose answers are genuine PERMITs under its own key until spoiled.

    ``spoil_execute`` / ``spoil_consume`` rewrite one answer; ``keys_served`` is the keys
    document it publishes; ``hang_on`` names the calls it never answers (``"execute"``,
    ``"consume"``, ``"outcome"``).
    """

    tenant = "demo"
    authority = "execguard"
    sensitive = frozenset({"beneficiary_account"})

    def __init__(self, *, spoil_execute: Spoiler | None = None,
                 spoil_consume: Spoiler | None = None, ttl_seconds: int = 60) -> None:
        self.signer = Signer.generate()
        self.other_signer = Signer.generate()  # a key that is never published
        self.keys_served: Any = keys_document(self.signer)
        self.spoil_execute = spoil_execute
        self.spoil_consume = spoil_consume
        self.ttl_seconds = ttl_seconds
        self.hang_on: set[str] = set()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []
        self.claims: dict[str, dict[str, Any]] = {}
        self.receipts: dict[str, dict[str, Any]] = {}
        self._index = 0
        super().__init__(_FakeGatewayHandler)

    def stop(self) -> None:
        self.release.set()
        super().stop()

    def record(self, method: str, path: str) -> None:
        with self.lock:
            self.calls.append((method, path))

    def paths(self, method: str = "POST") -> list[str]:
        with self.lock:
            return [p for m, p in self.calls if m == method]

    def _next_index(self) -> int:
        with self.lock:
            self._index += 1
            return self._index - 1

    # -- building answers the way the real gateway does ---------------------------------

    def seal(self, fields: dict[str, Any], signer: Signer | None = None) -> dict[str, Any]:
        return seal_receipt(fields, signer or self.signer)

    def sign_token(self, claims: dict[str, Any], signer: Signer | None = None) -> str:
        return issue_execution_token(claims, signer or self.signer)

    def unsafe_token(self, claims: dict[str, Any], header: dict[str, Any],
                     signature: bytes | None = None) -> str:
        """A JWT with any header; signed (Ed25519, own key) over its signing input unless
        ``signature`` is given."""
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode()))
        if signature is None:
            signature = self.signer.sign(signing_input.encode("ascii"))
        return signing_input + "." + _b64url(signature)

    def decide(self, body: bytes, idempotency_key: str | None) -> dict[str, Any]:
        """A PERMIT for the request, exactly as the real gateway would shape it."""
        request = parse_execution_request(body, idempotency_header=idempotency_key)
        digest = request_hash(normalized_request(self.tenant, request, self.sensitive))
        execution_id = str(uuid.uuid4())
        now = time.time()
        receipt = self.seal({
            "receiptType": "decision", "executionId": execution_id, "decision": "PERMIT",
            "surface": request.surface, "actorId": request.actor_id,
            "timestamp": format_timestamp(datetime.fromtimestamp(now, UTC)),
            "requestHash": digest, "policyVersion": "f" * 64, "reasonCode": "WITHIN_LIMIT",
            "determiningPolicies": ["payment-within-limit"], "executionMode": "enforce",
            "wouldDecision": None, "protocolVersion": "execguard/1",
            "authorityId": self.authority, "subjectDigest": request.subject_digest,
            "logIndex": self._next_index()})
        claims = execution_token_claims(
            issuer=self.authority, tenant=self.tenant, surface=request.surface,
            request_hash=digest, execution_id=execution_id, actor_id=request.actor_id,
            policy_version="f" * 64, issued_at=int(now), ttl_seconds=self.ttl_seconds)
        with self.lock:
            self.claims[execution_id] = claims
            self.receipts[execution_id] = receipt
        return {"decision": "PERMIT", "execution_id": execution_id, "surface": request.surface,
                "reason": "permitted", "reasonCode": "WITHIN_LIMIT",
                "policyVersion": "f" * 64, "determiningPolicies": ["payment-within-limit"],
                "executionMode": "enforce", "execution_token": self.sign_token(claims),
                "token_expires_at": format_timestamp(datetime.fromtimestamp(
                    claims["exp"], UTC)),
                "receipt": receipt, "request_id": "fake"}

    def _follow_up(self, kind: str, execution_id: str) -> dict[str, Any]:
        decision = self.receipts[execution_id]
        return {"receiptType": kind, "executionId": execution_id,
                "decisionReceiptHash": decision["receiptHash"], "surface": decision["surface"],
                "actorId": decision["actorId"],
                "timestamp": format_timestamp(datetime.now(UTC)),
                "protocolVersion": "execguard/1", "authorityId": self.authority,
                "logIndex": self._next_index()}

    def consume(self, execution_id: str, body: dict[str, Any]) -> dict[str, Any]:
        receipt = self.seal({**self._follow_up("consume", execution_id),
                             "requestHash": body.get("requestHash"),
                             "consumeResult": "CONSUMED", "refusalReason": None})
        return {"consumed": True, "executionId": execution_id, "receipt": receipt}

    def outcome(self, execution_id: str, body: dict[str, Any]) -> dict[str, Any]:
        receipt = self.seal({**self._follow_up("outcome", execution_id),
                             "outcome": body.get("result"), "latencyMs": body.get("latencyMs"),
                             "resultDigest": body.get("resultDigest"),
                             "consumeReceiptHash": None})
        return {"executionId": execution_id, "outcome": body.get("result"), "receipt": receipt}


def permit_header(key_id: str, **changes: Any) -> dict[str, Any]:
    """The JOSE header of a genuine permit, with ``changes`` applied."""
    return {"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": key_id, **changes}


# -- the black hole --------------------------------------------------------------------


class BlackHole:
    """A TCP listener that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.05)
        self.port = int(self._sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(conn)  # held open, never read from or written to

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self._sock.close()


class Trickler(BlackHole):
    """Accepts, reads the request, then answers one byte every 0.1 s, forever.

    ``part="headers"`` trickles the header block itself; ``part="body"`` sends complete
    headers announcing a large body and trickles that. Every single read succeeds well
    within any per-read timeout, so only a deadline on the whole answer stops a client.
    """

    def __init__(self, part: str) -> None:
        if part not in ("headers", "body"):
            raise ValueError(part)
        self.part = part
        super().__init__()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(conn)
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            if self.part == "body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000000\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not self._stop.wait(0.1):
                conn.sendall(b" " if self.part == "body" else b"a")
        except OSError:
            pass
