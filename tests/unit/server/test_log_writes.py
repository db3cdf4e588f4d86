"""Log lines reach stderr in writes a pipe keeps whole (the server and its decision
process share it)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from execguard.server.logs import _whole_lines


@given(st.lists(st.text(max_size=3000).map(lambda text: text.replace("\n", "") + "\n"),
                max_size=30), st.integers(min_value=64, max_value=4096))
def test_lines_are_grouped_whole_within_the_limit(lines: list[str], limit: int) -> None:
    chunks = list(_whole_lines(lines, limit))
    assert "".join(chunks) == "".join(lines)
    for chunk in chunks:
        assert chunk.endswith("\n")
        # Over the limit only when a single line is: it goes alone, never split.
        assert len(chunk.encode("utf-8")) <= limit or chunk.count("\n") == 1
