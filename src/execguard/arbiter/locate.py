"""Finding line numbers in Cedar policy and schema text, for error messages.

cedarpy reports parse errors as a bare message ("unexpected token `}`") with no
position, and reports validation errors by the parser's positional policy id
(``policy3``). These helpers recover positions from the source text: a small
scanner that knows Cedar's strings and ``//`` comments splits a file into
statements, and :func:`locate_error` re-parses growing prefixes of a file to
find the first line at which the parser's error appears. The results only
improve messages; no decision depends on them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Statement", "blank_comments", "locate_error", "split_statements"]

# Prefix re-parsing costs one parse per line; beyond this the message goes without a line.
_MAX_SCAN_LINES = 5000
# ...and the parses together read at most this many characters (a second or so).
_MAX_SCAN_CHARACTERS = 20_000_000


@dataclass(frozen=True)
class Statement:
    """One ``;``-terminated statement of a Cedar file."""

    begin_line: int  # line of the first character after the previous statement
    start_line: int  # line of the first character that is not space or comment
    code: str  # the statement's text with comments replaced by spaces

    def line_of(self, pattern: str) -> int | None:
        """The line of the first match of ``pattern`` in the statement's code."""
        match = re.search(pattern, self.code)
        if match is None:
            return None
        return self.begin_line + self.code.count("\n", 0, match.start())


def _scan(text: str) -> tuple[str, list[tuple[int, int, int, int]]]:
    """Blank out comments; return the code and (begin, end, begin_line, start_line) spans."""
    code = list(text)
    spans: list[tuple[int, int, int, int]] = []
    index, line, begin, begin_line, start_line = 0, 1, 0, 1, 0
    in_string = in_comment = False
    while index < len(text):
        char = text[index]
        if in_comment:
            if char == "\n":
                in_comment = False
            else:
                code[index] = " "
        elif in_string:
            if char == "\\" and index + 1 < len(text):
                index += 1
                line += text[index] == "\n"
            elif char == '"':
                in_string = False
        elif char == "/" and text.startswith("//", index):
            in_comment = True
            code[index] = " "
        else:
            if not char.isspace() and not start_line:
                start_line = line
            if char == '"':
                in_string = True
            elif char == ";":
                spans.append((begin, index + 1, begin_line, start_line))
                begin, begin_line, start_line = index + 1, line, 0
        line += char == "\n"
        index += 1
    if start_line:
        spans.append((begin, len(text), begin_line, start_line))
    return "".join(code), spans


def blank_comments(text: str) -> str:
    """``text`` with every ``//`` comment replaced by spaces (lines stay where they are)."""
    return _scan(text)[0]


def split_statements(text: str) -> list[Statement]:
    """The statements of a Cedar policy file, in order; the i-th is Cedar's ``policy<i>``."""
    code, spans = _scan(text)
    return [Statement(begin_line, start_line, code[begin:end])
            for begin, end, begin_line, start_line in spans]


def _snippet(message: str) -> str | None:
    quoted = re.search(r"`([^`]+)`", message)
    if quoted:
        return quoted.group(1)
    tail = message.rsplit(": ", 1)
    return tail[1].strip() if len(tail) == 2 and tail[1].strip() else None


def locate_error(text: str, parse: Callable[[str], object], message: str) -> int | None:
    """The line at which parsing ``text`` fails with ``message``, or ``None``.

    A prefix that stops inside a construct fails with "unexpected end of
    input"; the first prefix failing with the full text's own message ends on
    the offending line. Errors found only once a whole construct is read (an
    unknown type, a bad member access) surface at its last line, so the line
    is then moved back to where the quoted culprit appears.

    Re-parsing every prefix of a long file costs time quadratic in its length
    (minutes for a few thousand lines), so the ``;``-terminated statement that
    fails with the same message on its own is found first (one parse each)
    and only its lines are scanned; when no statement does (a schema's
    namespace spans many), the whole text is, within a bounded amount of work.
    """
    for statement in split_statements(text):
        try:
            parse(statement.code)
        except ValueError as exc:
            if str(exc) == message:
                line = _scan_prefixes(statement.code, parse, message)
                return None if line is None else statement.begin_line + line - 1
    return _scan_prefixes(text, parse, message)


def _scan_prefixes(text: str, parse: Callable[[str], object], message: str) -> int | None:
    """:func:`locate_error` by re-parsing growing prefixes of ``text``."""
    lines = text.splitlines(keepends=True)
    last_ok = 0
    budget = _MAX_SCAN_CHARACTERS
    length = 0
    for count in range(1, min(len(lines), _MAX_SCAN_LINES) + 1):
        length += len(lines[count - 1])
        budget -= length
        if budget < 0:
            return None
        try:
            parse("".join(lines[:count]))
        except ValueError as exc:
            if str(exc) != message:
                continue
            snippet = _snippet(message)
            if snippet:
                for number in range(count, last_ok, -1):
                    if snippet in lines[number - 1]:
                        return number
            return count
        else:
            last_ok = count
    return None
