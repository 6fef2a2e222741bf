"""Every configuration key is named in the documentation.

A key is named when the docs (docs/*.md, README.md) hold its dotted path
(``limits.max_frame``) or its own name as a word (``max_frame``, in a table of
its section): an operator reading them can find every setting there is.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import msgspec

from bastion.config import Config, load_config

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


def _docs() -> dict[str, str]:
    return {path.name: path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}


def test_the_configuration_samples_in_the_docs_load() -> None:
    """Each ```toml block of the docs is a configuration file `bastion serve --config` accepts (its keys exist,
    its values pass validation), and each ``BASTION_…=value`` shown is a variable it accepts."""
    blocks = [(name, block) for name, text in _docs().items() for block in re.findall(r"```toml\n(.*?)```", text, re.S)]
    assert len(blocks) >= 3
    for name, block in blocks:
        data = tomllib.loads(block)
        try:
            msgspec.convert(data, Config, strict=False)
        except msgspec.ValidationError as exc:
            raise AssertionError(f"{name}: a configuration sample does not load: {exc}\n{block}") from None
    shown = {m for text in _docs().values() for m in re.findall(r"\b(BASTION_[A-Z0-9_]+=[^\s`)]+)", text)}
    variables = [(m.partition("=")[0], m.partition("=")[2].strip("'\"")) for m in shown]
    variables = [(k, v) for k, v in variables if not k.startswith("BASTION_MALLOC_") and v not in ("N", "N,")]
    assert len(variables) >= 5
    for key, value in variables:
        load_config(environ={key: value})  # a UsageError names the variable
