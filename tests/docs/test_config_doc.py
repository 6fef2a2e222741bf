"""Every configuration key is named in the documentation.

A key is named when the docs (docs/*.md, README.md) hold its dotted path
(``limits.max_frame``) or its own name as a word (``max_frame``, in a table of
its section): an operator reading them can find every setting there is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import msgspec

from bastion.config import Config

ROOT = Path(__file__).parents[2]


def keys(struct: type[msgspec.Struct], prefix: str = "") -> Iterator[str]:
    for field in msgspec.structs.fields(struct):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            yield from keys(field.type, f"{prefix}{field.name}.")
        else:
            yield prefix + field.name


def test_every_configuration_key_is_named_in_the_docs() -> None:
    docs = "\n".join(path.read_text() for path in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"])
    every = list(keys(Config))
    assert len(every) > 100  # the walk found the sections

    def named(key: str) -> bool:
        return key in docs or re.search(rf"\b{re.escape(key.rpartition('.')[2])}\b", docs) is not None

    assert [key for key in every if not named(key)] == []
