"""What the commands print of server data: one line per item, whatever the text holds."""

from __future__ import annotations

import json

import pytest

from bastion.cli.common import _json, json_line, shown


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text, ünïcode ✓", "plain text, ünïcode ✓"),
        ("a\nb\r\tc", "a\\nb\\r\\tc"),
        ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
        ("\x9b31m", "\\x9b31m"),  # C1 CSI: an escape sequence without ESC
        ("report\u202egpj.exe", "report\\u202egpj.exe"),  # a bidi override reorders what follows
        ("line\u2028sep", "line\\u2028sep"),
    ],
)
def test_shown_escapes_what_a_terminal_would_act_on(text: str, expected: str) -> None:
    assert shown(text) == expected


def test_json_output_is_the_same_json_with_nothing_a_terminal_acts_on() -> None:
    value = {"k\x9b\u202e": ["a\nb\x1b", "\u2028\U000e0041", "plain ✓"], "n": 1}
    for text in (_json(value), json_line(value)):
        assert json.loads(text) == value
        assert all(c.isprintable() or c == "\n" for c in text)
    assert "\n" not in json_line(value)
