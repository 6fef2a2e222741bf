"""Reading a ``.bbk`` archive (bastion/store/archive.py tells its format) back, checking every byte.

``read_archive`` never trusts the archive before it has read all of it:
members are extracted into a staging directory (only the paths a manifest
may name, regular files only, sizes and hashes checked as they are
written) and the framing is read to its authenticated last chunk. Nothing
in the tar stream is read into memory beyond what bastion itself writes
(the manifest, capped; pax headers of a few bytes): any other header is
refused before its data is read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import msgspec

from bastion.exceptions import DataLoss, FailedPrecondition, InvalidArgument, ResourceExhausted
from bastion.store.archive import (
    BLOB_PATH,
    FILE_MODE,
    FORMAT,
    MANIFEST,
    MAX_EXTENDED_HEADER,
    MAX_MANIFEST,
    POSTGRES_MEMBER,
    SQLITE_MEMBER,
    Manifest,
    Member,
)
from bastion.store.archive_framing import FORMAT_VERSION, _FramedReader
from bastion.store.backup_progress import Meter, Progress
from bastion.store.leftovers import remove_stale, staging_name
from bastion.store.migrations import LATEST

__all__ = ["private_dirs", "read_archive", "staging_dir"]


def read_archive(
    archive: Path, staging: Path, passphrase: bytes | None, *, blobs: bool = True, progress: Progress | None = None
) -> Manifest:
    """Check all of ``archive`` and extract its members under ``staging`` (which must be empty).

    Every byte of the file is checked: the framing to its authenticated last
    chunk, the manifest, each member's size and SHA-256. What a member holds
    is not looked into (``bastion.store.backup`` checks the database).

    ``blobs=False`` checks the blobs without writing them (verifying needs
    only the database on disk, and may run in a live server's data
    directory). Before writing anything, the members to write must fit in
    the free space of ``staging``'s file system.

    ``progress`` hears the ``verify`` phase (bastion/store/backup_progress.py): the archive's bytes as
    they are read, up to its size.

    Raises ``DataLoss`` for anything corrupt or tampered with,
    ``InvalidArgument`` for a missing or wrong passphrase, and
    ``ResourceExhausted`` if the members do not fit; on error, ``staging``
    may hold partial files (the caller removes it).
    """
    try:
        src = open(archive, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InvalidArgument(f"cannot read archive {archive}: {exc.strerror}") from None
    with src:
        meter = Meter(progress, "verify", os.fstat(src.fileno()).st_size)
        counted = cast(BinaryIO, _Counted(src, meter)) if progress is not None else src
        reader = _FramedReader(counted, passphrase)
        try:
            manifest = _extract(reader, staging, blobs)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise DataLoss(f"archive is corrupt: {exc}") from exc
        reader.drain()
    meter.finish()
    return manifest


class _Counted:
    """The archive file as the framing reads it, counted."""

    def __init__(self, src: BinaryIO, meter: Meter) -> None:
        self._src = src
        self._meter = meter

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self._meter.add(len(data))
        return data


class _StrictTarInfo(tarfile.TarInfo):
    """Refuses, before reading it, any header bastion does not write: tarfile reads a pax or GNU long-name
    header's data whole into memory (a few hundred KB of compressed zeros can claim gigabytes), and a
    sparse header's extension blocks one by one into a list. Only regular files, with small pax headers
    (what ``PAX_FORMAT`` adds for a member over 8 GiB), pass."""

    def _proc_member(self, tar: Any) -> Any:  # tar: the TarFile reading (tarfile calls it positionally)
        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            if not 0 <= self.size <= MAX_EXTENDED_HEADER:
                raise DataLoss(f"archive is corrupt: a {self.size}-byte extended (pax) tar header")
        elif self.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise DataLoss(f"archive is corrupt: a tar header of a type bastion does not write ({self.type!r})")
        return super()._proc_member(tar)  # type: ignore[misc]


def _extract(reader: _FramedReader, staging: Path, blobs: bool) -> Manifest:
    with tarfile.open(fileobj=reader, mode="r|", tarinfo=_StrictTarInfo) as tar:
        first = tar.next()
        if first is None or first.name != MANIFEST or not first.isreg() or first.size > MAX_MANIFEST:
            raise DataLoss("archive is corrupt: it does not start with its manifest")
        manifest = _decode_manifest(_read_member(tar, first))
        written = {m.path for m in manifest.members if blobs or not m.path.startswith("files/")}
        _check_space(staging, sum(m.size for m in manifest.members if m.path in written))
        expected = {m.path: m for m in manifest.members}
        seen: set[str] = set()
        while (info := tar.next()) is not None:
            member = expected.get(info.name)
            if member is None or info.name in seen or not info.isreg() or info.size != member.size:
                raise DataLoss(f"archive is corrupt: unexpected member {info.name[:200]!r}")
            seen.add(info.name)
            _copy_member(tar, info, member, staging if info.name in written else None)
    missing = set(expected) - seen
    if missing:
        raise DataLoss(f"archive is incomplete: {len(missing)} members missing, e.g. {sorted(missing)[0]!r}")
    return manifest


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    assert f is not None
    return f.read()


def _decode_manifest(data: bytes) -> Manifest:
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except msgspec.ValidationError as exc:
        raise DataLoss(f"archive manifest is invalid: {exc}") from None
    if manifest.format != FORMAT or manifest.format_version != FORMAT_VERSION:
        raise DataLoss(f"unknown archive format {manifest.format!r} version {manifest.format_version}")
    if manifest.backend not in ("sqlite", "postgresql"):
        raise DataLoss(f"archive manifest names an unknown backend {manifest.backend[:40]!r}")
    db = SQLITE_MEMBER if manifest.backend == "sqlite" else POSTGRES_MEMBER
    paths = [m.path for m in manifest.members]
    if paths.count(db) != 1 or len(set(paths)) != len(paths):
        raise DataLoss("archive manifest is invalid: the database member is missing or a path repeats")
    for m in manifest.members:
        blob = BLOB_PATH.fullmatch(m.path)
        if m.path != db and not (blob and blob[2].startswith(blob[1]) and blob[2] == m.sha256):
            raise DataLoss(f"archive manifest names a path it may not: {m.path[:200]!r}")
        if m.size < 0 or not re.fullmatch(r"[0-9a-f]{64}", m.sha256):
            raise DataLoss(f"archive manifest entry {m.path!r} is invalid")
    if manifest.schema_version > LATEST:
        raise FailedPrecondition(
            f"the archive has schema version {manifest.schema_version}, newer than this bastion knows ({LATEST})"
        )
    return manifest


def _check_space(staging: Path, needed: int) -> None:
    free = shutil.disk_usage(staging).free
    if needed > free:
        raise ResourceExhausted(
            f"this archive needs {needed} bytes unpacked in {staging.parent}, and only {free} are free there; "
            "nothing was changed"
        )


def private_dirs(root: Path, directory: Path) -> None:
    """Make ``directory`` (under ``root``, which exists) and every missing one between them 0700: ``mkdir
    (parents=True)`` gives the parents the umask's mode, 0755 for ``files/`` and ``files/blobs/``."""
    for path in [*reversed(directory.relative_to(root).parents), directory.relative_to(root)]:
        with contextlib.suppress(FileExistsError):
            (root / path).mkdir(mode=0o700)


def _copy_member(tar: tarfile.TarFile, info: tarfile.TarInfo, member: Member, staging: Path | None) -> None:
    """Check one member's bytes against its SHA-256, writing them under ``staging`` (None: only check)."""
    f = tar.extractfile(info)
    assert f is not None
    digest = hashlib.sha256()
    if staging is None:
        while block := f.read(1 << 20):
            digest.update(block)
    else:
        target = staging / member.path  # member.path was checked against the allowed shapes
        private_dirs(staging, target.parent)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as out:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                message = f"no space left to unpack the archive in {staging.parent}: {exc.strerror}"
                raise ResourceExhausted(message) from exc
            raise
    if digest.hexdigest() != member.sha256:
        raise DataLoss(f"archive is corrupt: {member.path} does not match its SHA-256")


@contextlib.contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A new private (0700) directory under ``parent``, removed with all it holds on exit (or, if the process
    is killed, by the next one made there: bastion/store/leftovers.py)."""
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    remove_stale(parent)  # those of killed backups and restores
    path = parent / staging_name(secrets.token_hex(4))
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
