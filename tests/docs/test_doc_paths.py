"""What the docs point a reader at exists: relative links (and their #anchors) and repository paths in code spans."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_relative_links_and_their_anchors_resolve() -> None:
    broken, checked = [], 0
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            name, _, anchor = target.partition("#")
            path = (doc.parent / name) if name else doc
            checked += 1
            if not path.exists():
                broken.append(f"{doc.name}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert broken == []
    assert checked > 10


def test_repository_paths_named_in_code_spans_exist() -> None:
    named = {
        path
        for doc in DOCS
        for path in re.findall(
            r"`((?:bastion|tests|bench|scripts|examples|fuzz)/[\w/.-]+\.(?:py|md|toml))`", doc.read_text()
        )
    }
    assert len(named) > 10
    assert sorted(path for path in named if not (ROOT / path).exists()) == []
