"""The source scanner that turns Cedar's position-less errors into line numbers."""

from __future__ import annotations

import cedarpy

from execguard.arbiter.locate import blank_comments, locate_error, split_statements

TEXT = """\
// a comment; with a semicolon
@id("one") permit (principal, action, resource)
when { context.s == "a;b // not a comment" };

@id("two; \\" tricky")
forbid (principal, action, resource);
"""


def test_statements_ignore_semicolons_in_strings_and_comments() -> None:
    statements = split_statements(TEXT)
    assert [s.start_line for s in statements] == [2, 5]
    assert statements[1].line_of(r"@id") == 5
    assert statements[1].line_of(r"forbid") == 6
    parsed = cedarpy.policies_to_json_str(TEXT)
    assert parsed.count('"effect"') == len(statements)


def test_comments_are_blanked_in_place() -> None:
    code = blank_comments(TEXT)
    assert len(code) == len(TEXT) and code.count("\n") == TEXT.count("\n")
    assert "semicolon" not in code and "not a comment" in code


def test_locate_error_finds_the_line() -> None:
    text = '@id("a")\npermit (principal, action, resource)\nwhen { context.x > };\n'
    try:
        cedarpy.policies_to_json_str(text)
    except ValueError as exc:
        assert locate_error(text, cedarpy.policies_to_json_str, str(exc)) == 3
    else:
        raise AssertionError("the policy should not parse")


def test_locate_error_moves_back_to_the_culprit() -> None:
    text = '@id("a")\npermit (principal, action, resource)\nwhen {\n  bogus.x\n};\n'
    try:
        cedarpy.policies_to_json_str(text)
    except ValueError as exc:
        assert locate_error(text, cedarpy.policies_to_json_str, str(exc)) == 4
    else:
        raise AssertionError("the policy should not parse")


def test_locate_error_in_a_long_file_does_not_reparse_every_prefix() -> None:
    # One parse per line of ever longer prefixes took ten minutes for 4,000 policies.
    good = "".join(f'@id("p{i}") forbid (principal, action, resource) '
                   f"when {{ context.x == {i} }};\n" for i in range(1000))
    text = good + '@id("bad")\npermit (principal, action, resource)\nwhen { context.x > };\n'
    parsed: list[int] = []

    def counting_parse(source: str) -> object:
        parsed.append(len(source))
        return cedarpy.policies_to_json_str(source)

    try:
        cedarpy.policies_to_json_str(text)
    except ValueError as exc:
        assert locate_error(text, counting_parse, str(exc)) == 1003
    else:
        raise AssertionError("the policy should not parse")
    assert sum(parsed) < 20 * len(text)
