"""Frames between the server and its decision process, and the answer's request id."""

from __future__ import annotations

import asyncio

import orjson
from hypothesis import given
from hypothesis import strategies as st

from execguard.protocol.errors import MalformedRequest
from execguard.protocol.request import parse_execution_request
from execguard.server.frames import (
    FrameBuffer,
    decode_request,
    encode_frame,
    encode_request,
    read_frame,
)
from execguard.server.middleware import new_request_id, with_request_id

#: What orjson writes: 64-bit integers.
int64 = st.integers(-2**63, 2**63 - 1)
headers = st.dictionaries(st.text(max_size=20),
                          st.one_of(st.none(), int64, st.text(max_size=40)), max_size=5)


@given(st.lists(st.tuples(headers, st.binary(max_size=300)), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=50))
def test_frames_come_back_whole_however_the_bytes_arrive(
        frames: list[tuple[dict[str, object], bytes]], chunk: int) -> None:
    stream = b"".join(encode_frame(header, body) for header, body in frames)
    buffer = FrameBuffer()
    got: list[tuple[dict[str, object], bytes]] = []
    for start in range(0, len(stream), chunk):
        buffer.feed(stream[start:start + chunk])
        got += buffer.frames(limit=3)
    got += buffer.frames(limit=len(frames))
    assert got == frames
    assert not buffer.pending


def test_a_partial_frame_waits_for_the_rest() -> None:
    frame = encode_frame({"id": 1}, b'{"a":1}')
    buffer = FrameBuffer()
    buffer.feed(frame[:-1])
    assert buffer.frames(limit=10) == [] and buffer.pending
    buffer.feed(frame[-1:])
    assert buffer.frames(limit=10) == [({"id": 1}, b'{"a":1}')]


def test_the_async_reader_reads_frames_and_end_of_stream() -> None:
    async def read_all() -> list[object]:
        reader = asyncio.StreamReader()
        reader.feed_data(encode_frame({"ready": 7}) + encode_frame({"id": 2}, b"body"))
        reader.feed_eof()
        return [await read_frame(reader), await read_frame(reader), await read_frame(reader)]

    assert asyncio.run(read_all()) == [({"ready": 7}, b""), ({"id": 2}, b"body"), None]


def test_a_frame_cut_short_is_an_error_not_an_end() -> None:
    async def read_cut() -> object:
        reader = asyncio.StreamReader()
        reader.feed_data(encode_frame({"id": 3}, b"body")[:-2])
        reader.feed_eof()
        return await read_frame(reader)

    try:
        asyncio.run(read_cut())
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    raise AssertionError("a truncated frame was taken for a whole one")


@given(st.dictionaries(st.text(min_size=1, max_size=10),
                       st.one_of(int64, st.text(max_size=30), st.none()),
                       min_size=1, max_size=6).filter(lambda d: "request_id" not in d))
def test_the_request_id_is_added_as_orjson_would_write_it(answer: dict[str, object]) -> None:
    request_id = new_request_id()
    assert with_request_id(orjson.dumps(answer), request_id) == \
        orjson.dumps({**answer, "request_id": request_id})


#: Any JSON: what a body may hold, valid for the parser or not.
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**60, 2**60),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=12)


def _typed(value: object) -> object:
    """``value`` with each number's type kept apart (1, 1.0 and -0.0 compare equal)."""
    if isinstance(value, dict):
        return [(key, _typed(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [_typed(item) for item in value]
    return (type(value).__name__, repr(value))


@given(context=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
       signals=st.dictionaries(st.text(max_size=8), json_values, max_size=2),
       actor=st.one_of(st.none(), st.text(min_size=1, max_size=10)),
       key=st.one_of(st.none(), st.text(min_size=1, max_size=10)))
def test_a_validated_request_crosses_to_the_worker_unchanged(
        context: dict[str, object], signals: dict[str, object], actor: str | None,
        key: str | None) -> None:
    body = orjson.dumps({"surface": "payment.execute", "actorId": actor, "context": context,
                         "signals": signals, "idempotencyKey": key, "sessionId": "s-1"})
    try:
        request = parse_execution_request(body)
    except MalformedRequest:
        return  # refused by the server: never sent
    crossed = decode_request(encode_request(request))
    assert crossed == request
    assert _typed(crossed.context) == _typed(request.context)
    assert _typed(crossed.signals) == _typed(request.signals)
