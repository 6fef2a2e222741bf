"""Command-line key=value words -> typed arguments, driven by the method's schema."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from bastion.cli.values import parse_arguments
from bastion.exceptions import UsageError

Args = msgspec.defstruct(
    "demo.args",
    [
        ("name", str),
        ("n", int, 1),
        ("ratio", float, 0.5),
        ("flag", bool, False),
        ("tags", list[str], []),
        ("data", bytes, b""),
        ("maybe", int | None, None),
    ],
    kw_only=True,
)
SCHEMA = msgspec.json.schema(Args)["$defs"]["demo.args"]


def test_values_follow_the_declared_types() -> None:
    got = parse_arguments(["name=007", "n=007", "ratio=2", "flag=true", 'tags=["a","b"]', "maybe=null"], SCHEMA)
    assert got == {"name": "007", "n": 7, "ratio": 2.0, "flag": True, "tags": ["a", "b"], "maybe": None}


def test_at_file_reads_text_or_bytes(tmp_path: Path) -> None:
    path = tmp_path / "v.txt"
    path.write_bytes(b"hello\n")
    got = parse_arguments([f"name=@{path}", f"data=@{path}"], SCHEMA)
    assert got == {"name": "hello\n", "data": b"hello\n"}


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["name"], "not key=value"),
        (["nope=1"], "unknown argument 'nope'"),
        (["n=x"], "not a valid integer"),
        (["name=a", "name=b"], "given twice"),
        (["tags=[1"], "not valid JSON"),
        (["name=@/no/such/file"], "cannot read"),
    ],
)
def test_bad_words_are_usage_errors(words: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_arguments(words, SCHEMA)


def test_without_a_schema_json_is_guessed() -> None:
    assert parse_arguments(["a=1", "b=x", "c=[1]"], None) == {"a": 1, "b": "x", "c": [1]}
