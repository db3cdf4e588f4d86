"""The OpenAPI description of the ``/execute`` body (the handler parses it itself)."""

from __future__ import annotations

from typing import Any

__all__ = ["EXECUTE_REQUEST_SCHEMA"]

_OPTIONAL_STRING = {"type": ["string", "null"]}

EXECUTE_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["surface"],
    "properties": {
        "surface": {"type": "string", "examples": ["payment.execute"],
                    "description": "The governed surface, as named in the surface registry."},
        "action": {**_OPTIONAL_STRING, "description": "A finer action name, passed to policy."},
        "actorId": {**_OPTIONAL_STRING, "description": "Who proposes the action."},
        "context": {"type": "object", "description": "The action's details, checked against "
                    "the surface registry. 'facts' and 'now' are reserved."},
        "signals": {"type": "object", "description": "Risk signals."},
        "idempotencyKey": {**_OPTIONAL_STRING,
                           "description": "Also accepted as the Idempotency-Key header."},
        "sessionId": _OPTIONAL_STRING,
        "subjectDigest": _OPTIONAL_STRING,
        "executionMode": {"enum": ["enforce", "observe"], "default": "enforce"},
    },
}
