"""The ExecGuard exception tree.

Every error ExecGuard raises on purpose descends from :class:`ExecGuardError`.
``str(exc)`` is one short line for logs; :meth:`ExecGuardError.diagnostics`
is the longer text for a person, with a next step. Only two places render
diagnostics: the CLI and the HTTP error handlers.

A DENY, ESCALATE or SILENCE is a *decision*, not an error: none of these
classes is ever used to say "no".

    ExecGuardError
    ├── RequestError                  the caller sent something we cannot decide on
    │   ├── MalformedRequest          body is not the contract (field, expected, got)
    │   ├── PayloadTooLarge           body over the configured limit
    │   ├── UnknownSurface            surface not in the active registry
    │   ├── IdempotencyKeyReuse       same key, different request
    │   ├── NotFound                  no such execution (for this tenant)
    │   └── Conflict                  conflicts with what is recorded
    │       └── PermitRefused         a permit cannot be consumed (carries the refusal receipt)
    ├── AuthError                     no or wrong credentials
    │   └── Forbidden                 credentials valid, but not for this
    ├── CanonicalizationError         a value has no exact canonical JSON form
    ├── BundleInvalid                 a policy bundle is refused (file, line, key)
    ├── ConfigError                   settings or data directory unusable
    ├── ServiceUnavailable            cannot decide durably right now (fail closed)
    │   ├── StorageUnavailable        the ledger could not commit
    │   ├── NoSigningKey              no active signing key
    │   └── PolicyUnusable            a stored policy version does not load in this release
    └── VerificationError             evidence does not verify
        ├── ReceiptHashMismatch       fields do not hash to receiptHash
        ├── SignatureInvalid          signature does not verify under the key
        └── UnknownKey                keyId not in the pinned keys document
"""

from __future__ import annotations

from typing import ClassVar


class ExecGuardError(Exception):
    """Root of every error ExecGuard raises on purpose."""

    #: Machine-readable code, used as ``error`` in HTTP bodies.
    code = "execguard_error"

    def diagnostics(self) -> str:
        """Text for a person: what went wrong and what to do next."""
        return str(self)


class RequestError(ExecGuardError):
    """The request cannot be decided on as sent; nothing was recorded."""

    code = "bad_request"


class MalformedRequest(RequestError):
    """A field of the request body is missing, of the wrong type, or out of range."""

    code = "malformed_request"

    def __init__(self, field: str, expected: str, got: str) -> None:
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(f"{field}: expected {expected}, got {got}")


class PayloadTooLarge(RequestError):
    """The request body is larger than the configured limit."""

    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"request body exceeds the limit of {limit} bytes")


class UnknownSurface(RequestError):
    """The surface is not in the tenant's active surface registry."""

    code = "unknown_surface"

    def __init__(self, surface: str) -> None:
        self.surface = surface
        super().__init__(f"surface {surface!r} is not in the active surface registry")

    def diagnostics(self) -> str:
        return (
            f"{self}. Check the spelling, or add the surface to surfaces.toml of the "
            "policy bundle and push and activate it."
        )


class IdempotencyKeyReuse(RequestError):
    """An idempotency key was sent again with a different request."""

    code = "idempotency_key_reuse"

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"idempotency key {key!r} was already used for a different request (or the "
            "same one in another executionMode); use a new key for a new request"
        )


class NotFound(RequestError):
    """The named object does not exist, or belongs to another tenant."""

    code = "not_found"


class Conflict(RequestError):
    """The request conflicts with what is already recorded."""

    code = "conflict"


class PermitRefused(Conflict):
    """A permit was not consumed; the refusal itself is a signed receipt in the log."""

    #: refusalReason -> error code
    CODES: ClassVar[dict[str, str]] = {
        "ALREADY_CONSUMED": "permit_already_consumed",
        "EXPIRED": "permit_expired",
        "REQUEST_MISMATCH": "request_mismatch",
        "NOT_PERMITTED": "not_permitted",
        "OUTCOME_RECORDED": "execution_ended",
    }
    MESSAGES: ClassVar[dict[str, str]] = {
        "ALREADY_CONSUMED": "the permit for execution {id} was already used: a permit runs "
                            "one execution, once",
        "EXPIRED": "the permit for execution {id} expired before it was used",
        "REQUEST_MISMATCH": "the request presented does not hash to the request execution {id} "
                            "was permitted for",
        "NOT_PERMITTED": "execution {id} was not permitted ({decision}): there is no permit",
        "OUTCOME_RECORDED": "execution {id} already has an outcome: it ended, and its permit "
                            "can no longer start it",
    }

    def __init__(self, reason: str, execution_id: str, receipt: object = None,
                 decision: str = "") -> None:
        self.reason = reason
        self.execution_id = execution_id
        self.receipt = receipt
        self.code = self.CODES.get(reason, "permit_refused")
        template = self.MESSAGES.get(reason, "the permit for execution {id} was refused")
        super().__init__(template.format(id=execution_id, decision=decision))


class AuthError(ExecGuardError):
    """The caller is not authenticated."""

    code = "unauthorized"


class Forbidden(AuthError):
    """The caller is authenticated but may not do this."""

    code = "forbidden"


class CanonicalizationError(ExecGuardError, ValueError):
    """A value has no exact RFC 8785 form (NaN, infinity, unsafe integer, bad key)."""

    code = "not_canonicalizable"


class BundleInvalid(ExecGuardError):
    """A policy bundle is refused; names the file, line and key where it can."""

    code = "bundle_invalid"

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.file = file
        self.line = line
        self.key = key
        where = file or "bundle"
        if line is not None:
            where += f":{line}"
        if key is not None:
            where += f" [{key}]"
        super().__init__(f"{where}: {message}")


class ConfigError(ExecGuardError):
    """Settings or the data directory are unusable."""

    code = "config_error"


class ServiceUnavailable(ExecGuardError):
    """The service cannot decide durably right now; it fails closed."""

    code = "service_unavailable"


class StorageUnavailable(ServiceUnavailable):
    """The ledger could not commit; nothing was acknowledged."""

    code = "storage_unavailable"

    def diagnostics(self) -> str:
        return (f"{self}. No decision was issued. Check the ledger: the SQLite file's disk and "
                "permissions, or that the PostgreSQL server is up and takes connections.")


class NoSigningKey(ServiceUnavailable):
    """There is no active signing key, so no receipt can be issued."""

    code = "keys_unavailable"


class PolicyUnusable(ServiceUnavailable):
    """A stored policy version does not load in this release (stored under an earlier
    one's rules): the tenant gets no decision under it until a corrected one is used."""


class VerificationError(ExecGuardError):
    """Evidence does not verify. Treat the object as untrusted."""

    code = "verification_failed"


class ReceiptHashMismatch(VerificationError):
    """The receipt's fields do not hash to its ``receiptHash``: it was modified."""

    code = "receipt_hash_mismatch"

    def __init__(self, stated: str, computed: str) -> None:
        self.stated = stated
        self.computed = computed
        super().__init__(
            f"receiptHash {stated} does not match the recomputed hash {computed}: "
            "a field of the receipt was changed after signing"
        )


class SignatureInvalid(VerificationError):
    """The signature does not verify under the named key."""

    code = "signature_invalid"

    def __init__(self, key_id: str, what: str = "receipt") -> None:
        self.key_id = key_id
        super().__init__(f"the {what} signature does not verify under key {key_id!r}")


class UnknownKey(VerificationError):
    """The key id is not in the pinned keys document."""

    code = "unknown_key"

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"key {key_id!r} is not in the keys document")
