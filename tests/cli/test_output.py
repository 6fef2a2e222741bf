"""What the commands print of server data: one line per item, whatever the text holds."""

from __future__ import annotations

import pytest

from bastion.cli.common import shown


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
