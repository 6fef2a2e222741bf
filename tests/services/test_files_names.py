"""File names that look alike: Unicode normalization forms and invisible bidi controls (real stores, both backends)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

import bastion
from bastion.services.files import check_name
from tests.services.test_files import World, run

pytestmark = pytest.mark.usefixtures("service_backend")

NFC = "café/résumé.txt"
NFD = unicodedata.normalize("NFD", NFC)


def test_names_are_stored_in_one_normalization_form(tmp_path: Path) -> None:
    """A macOS client sends decomposed names (NFD): "café" typed elsewhere (NFC) named another, identical-looking
    file."""
    assert NFC != NFD

    async def test(w: World) -> None:
        made = await w.put(w.alice, NFD, b"one")
        assert made["name"] == NFC
        assert (await w.alice.files.stat(name=NFC))["id"] == made["id"]
        assert (await w.alice.files.stat(name=NFD))["id"] == made["id"]
        with pytest.raises(bastion.AlreadyExists):  # not a second file that looks the same
            await w.alice.files.begin_upload(name=NFC, size=3, sha256="0" * 64)
        page = await w.alice.files.list(prefix=unicodedata.normalize("NFD", "café/"))
        assert [f["name"] for f in page["files"]] == [NFC]
        renamed = await w.alice.files.rename(name=NFC, new_name=unicodedata.normalize("NFD", "naïve"))
        assert renamed["name"] == "naïve"

    run(test, tmp_path)


def test_a_name_stored_before_normalization_is_still_found_by_its_own_spelling(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        made = await w.put(w.alice, "placeholder", b"old")
        await w.files.store.files_rename(made["id"], NFD, 0.0)  # as an older server stored it
        assert (await w.alice.files.stat(name=NFD))["id"] == made["id"]

    run(test, tmp_path)


def test_bidi_controls_and_invisible_separators_are_refused() -> None:
    """'invoice\u202efdp.exe' shows as 'invoiceexe.pdf' (Trojan Source, CVE-2021-42574)."""
    for bad in (
        "invoice\u202efdp.exe",
        "a\u2066b\u2069",
        "x\u200fy",
        "zero\u200bwidth",
        "bom\ufeff",
        "line\u2028sep",
        "p\u2029",
    ):
        with pytest.raises(bastion.InvalidArgument, match=r"invisible|bidirectional|separator"):
            check_name(bad)
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # the zero-width non-joiner is spelling in Persian
    assert check_name(persian) == persian
    assert check_name("👩\u200d💻") == "👩\u200d💻"  # and the zero-width joiner in emoji
