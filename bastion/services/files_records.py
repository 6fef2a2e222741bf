"""The files service's records -- what its methods return -- and the checks of the names and hashes callers give.

A ``FileInfo`` is a file as one caller sees it (with that caller's access);
``UploadInfo`` and ``UploadResult`` describe an upload in progress and what
one ``upload`` call achieved. ``check_name`` holds the rules for a file name
(bastion/services/files.py, "Identity"), ``access_of`` those of access; ``_info`` and ``_share_info`` make
records from the store's.
"""

from __future__ import annotations

import re
import unicodedata

import msgspec

from bastion.exceptions import InvalidArgument
from bastion.security.principal import ADMIN_ROLE, USER_NAME, Principal
from bastion.store.files import MAX_NAME_BYTES, FileRecord, FileShare

__all__ = ["FileInfo", "FilePage", "ShareInfo", "UploadInfo", "UploadPage", "UploadResult", "Usage", "check_name"]

_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
#: Kinds of access, weakest first: what each allows is in bastion/services/files.py ("Access").
RANK = {"read": 1, "write": 2, "owner": 3, "admin": 4}


class FileInfo(msgspec.Struct, frozen=True):
    """A file as a caller sees it; ``access`` is "owner", "admin", "write" or "read"."""

    id: str
    owner: str
    name: str
    size: int
    sha256: str
    created_at: float
    updated_at: float
    access: str


class FilePage(msgspec.Struct, frozen=True):
    """One page of ``files.list``; pass ``next`` as ``after`` for the next page (None: the last)."""

    files: list[FileInfo]
    next: str | None


class UploadInfo(msgspec.Struct, frozen=True):
    """An open upload: ``offset`` bytes of ``size`` are on the server; continue from there.

    ``owner`` is charged for it; ``uploader`` (who may continue it) differs when a write share let
    another user begin new contents for the owner's file. ``expected_sha256``: the contents it replaces
    must still be these when it finishes."""

    upload_id: str
    owner: str
    name: str
    size: int
    sha256: str
    offset: int
    file_id: str | None
    chunk_bytes: int
    expires_at: float
    uploader: str = ""
    expected_sha256: str | None = None


class UploadPage(msgspec.Struct, frozen=True):
    """One page of ``files.uploads``; pass ``next`` as ``after`` for the next page (None: the last)."""

    uploads: list[UploadInfo]
    next: str | None


class UploadResult(msgspec.Struct, frozen=True):
    """What an ``upload`` call achieved: ``complete`` with the ``file``, or ``offset`` so far."""

    upload_id: str
    offset: int
    complete: bool
    file: FileInfo | None


class ShareInfo(msgspec.Struct, frozen=True):
    file_id: str
    kind: str
    grantee: str
    mode: str
    created_at: float


class Usage(msgspec.Struct, frozen=True):
    """Bytes a user holds: finished files plus reserved by open uploads, against the quota."""

    user: str
    files_bytes: int
    reserved_bytes: int
    quota_bytes: int


#: Characters that change how a name displays without showing: bidirectional controls (Unicode's
#: Bidi_Control: "invoice\u202efdp.exe" shows as "invoiceexe.pdf", CVE-2021-42574), zero-width space and
#: BOM. Zero-width (non-)joiners stay: they are spelling in Persian or Indic scripts, and in emoji.
_INVISIBLE = frozenset("\u061c\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff")


def check_name(name: str) -> str:
    """``name`` in NFC if it is a valid file name; ``InvalidArgument`` saying why not.

    Names are kept in Unicode's composed form (NFC), so a name typed on one system and the same name
    decomposed by another (macOS gives NFD) are one name, not two files that look the same.
    """
    if not name:
        raise InvalidArgument("a file name must not be empty")
    name = unicodedata.normalize("NFC", name)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"a file name is at most {MAX_NAME_BYTES} bytes (UTF-8)")
    if any(unicodedata.category(c) == "Cc" for c in name):  # C0, DEL and C1 (U+0080..U+009F: NEL, CSI …)
        raise InvalidArgument("a file name must not contain NUL or other control characters")
    if any(c in _INVISIBLE or unicodedata.category(c) in ("Zl", "Zp") for c in name):
        raise InvalidArgument(
            "a file name must not contain invisible bidirectional controls, zero-width spaces or line separators"
        )
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise InvalidArgument(f"file name {name!r}: no leading, trailing or doubled '/', and no '.' or '..' segments")
    return name


def access_of(principal: Principal, record: FileRecord, shares: list[FileShare]) -> str | None:
    """``principal``'s access to ``record`` given its ``shares``: "owner", "admin", "write", "read" or None."""
    if record.owner == principal.name:
        return "owner"
    if ADMIN_ROLE in principal.roles:
        return "admin"
    best: str | None = None
    for share in shares:
        mine = (share.kind == "user" and share.grantee == principal.name) or (
            share.kind == "role" and share.grantee in principal.roles
        )
        if mine and (best is None or RANK[share.mode] > RANK[best]):
            best = share.mode
    return best


def check_grantee(user: str | None, role: str | None) -> tuple[str, str]:
    """``(kind, grantee)`` of a share given exactly one of ``user`` or ``role``; ``InvalidArgument`` if not."""
    if (user is None) == (role is None):
        raise InvalidArgument("give exactly one of user or role")
    kind, grantee = ("user", user) if user is not None else ("role", role)
    assert grantee is not None
    if not USER_NAME.fullmatch(grantee):
        raise InvalidArgument(f"{kind} {grantee!r} is not a valid {kind} name")
    return kind, grantee


def _check_sha256(value: str) -> str:
    digest = value.lower()
    if not _SHA256.match(digest):
        raise InvalidArgument("sha256 must be 64 hexadecimal digits")
    return digest


def _is_admin(principal: Principal) -> bool:
    return ADMIN_ROLE in principal.roles


def _info(record: FileRecord, access: str) -> FileInfo:
    return FileInfo(
        record.id, record.owner, record.name, record.size, record.sha256, record.created_at, record.updated_at, access
    )


def _share_info(share: FileShare) -> ShareInfo:
    return ShareInfo(share.file_id, share.kind, share.grantee, share.mode, share.created_at)
