"""Frames between the server and its decision process (``decision_process.py``).

One frame is a 4-byte big-endian length, then a JSON header (orjson: no raw
newline in it), a newline, and an opaque body (a request's or an answer's JSON
bytes, passed through untouched). The socket is private to the two processes.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["FrameBuffer", "encode_frame", "read_frame"]

_LENGTH = struct.Struct(">I")


def encode_frame(header: Mapping[str, Any], body: bytes = b"") -> bytes:
    """One frame, ready to write."""
    head = orjson.dumps(header)
    return _LENGTH.pack(len(head) + 1 + len(body)) + head + b"\n" + body


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
