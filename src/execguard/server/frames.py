"""Frames between the server and its decision process (``decision_process.py``).

One frame is a 4-byte big-endian length, then a JSON header (orjson: no raw
newline in it), a newline, and an opaque body (a request's or an answer's JSON
bytes, passed through untouched). The socket is private to the two processes.

A request crosses already validated (:func:`encode_request`): the server parses
and checks the body, so a malformed one is refused without a round trip, and the
decision process, whose core is the busier of the two, only reads it back.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from typing import Any

import orjson

from execguard.protocol.request import ExecutionRequest

__all__ = ["FrameBuffer", "decode_request", "encode_frame", "encode_request", "read_frame"]

_LENGTH = struct.Struct(">I")


def encode_frame(header: Mapping[str, Any], body: bytes = b"") -> bytes:
    """One frame, ready to write."""
    head = orjson.dumps(header)
    return _LENGTH.pack(len(head) + 1 + len(body)) + head + b"\n" + body


def encode_request(request: ExecutionRequest) -> bytes:
    """A validated request as a frame body (:func:`decode_request` reads it back).

    Exact: validation admits only values that orjson writes and reads back
    unchanged (finite floats, integers within ±(2**53 - 1), valid text, at most
    ``MAX_DEPTH`` levels), and keys keep their order.
    """
    return orjson.dumps({
        "surface": request.surface, "action": request.action, "actorId": request.actor_id,
        "context": request.context, "signals": request.signals,
        "subjectDigest": request.subject_digest, "sessionId": request.session_id,
        "idempotencyKey": request.idempotency_key, "executionMode": request.execution_mode})


def decode_request(body: bytes) -> ExecutionRequest:
    """The request :func:`encode_request` wrote, not validated again: it comes from the
    server, which validated it, over a socket only the two processes hold."""
    fields = orjson.loads(body)
    return ExecutionRequest(
        surface=fields["surface"], action=fields["action"], actor_id=fields["actorId"],
        context=fields["context"], signals=fields["signals"],
        subject_digest=fields["subjectDigest"], session_id=fields["sessionId"],
        idempotency_key=fields["idempotencyKey"], execution_mode=fields["executionMode"])


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes] | None:
    """The next frame's header and body; None when the other side has closed."""
    try:
        prefix = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionError("the other process closed the socket mid-frame") from None
        return None
    (size,) = _LENGTH.unpack(prefix)
    data = await reader.readexactly(size)
    head, _, body = data.partition(b"\n")
    return orjson.loads(head), body


class FrameBuffer:
    """Bytes received so far, split into whole frames (for a blocking socket)."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes) -> None:
        self._data += data

    @property
    def pending(self) -> bool:
        """Whether any bytes are waiting (a whole frame or part of one)."""
        return bool(self._data)

    def frames(self, limit: int) -> list[tuple[dict[str, Any], bytes]]:
        """Up to ``limit`` whole frames, removed from the buffer; a partial one stays."""
        found: list[tuple[dict[str, Any], bytes]] = []
        data, start = self._data, 0
        while len(found) < limit and len(data) - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(data, start)
            end = start + _LENGTH.size + size
            if len(data) < end:
                break
            head, _, body = bytes(data[start + _LENGTH.size:end]).partition(b"\n")
            found.append((orjson.loads(head), body))
            start = end
        del data[:start]
        return found
