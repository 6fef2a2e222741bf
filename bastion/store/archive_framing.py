"""The framing of a ``.bbk`` archive (bastion/store/archive.py): every byte of the file is checked.

The tar stream is compressed (zlib) and cut into chunks, and the chunks are
framed so that *every byte of the file* is checked, not only the members:

    header  magic "BSTNBAK1" | version | flags | scrypt log2(n), r, p | 0 |
            chunk size (u32) | salt (16) | check (32)
    chunk*  payload (chunk size bytes; the last one shorter or empty) + tag (16)

Encrypted (``passphrase``): scrypt(passphrase, salt) gives an AES-256-GCM
key and an HMAC key. ``check`` is the header's HMAC-SHA256, so a wrong
passphrase is told apart from damage. Each chunk is sealed with the nonce
``counter (11 bytes) | last (1 byte)`` and the header as associated data:
the STREAM construction (as in age), so a changed, dropped, reordered,
truncated or appended chunk fails to open. The salt is random, so every
archive has its own key and nonces never repeat under one key.

Plain: ``check`` is the header's SHA-256 and each tag is the first 16 bytes
of SHA-256(check | counter | last | payload). That detects any accidental
damage (one flipped byte anywhere) but not a deliberate forgery -- only a
passphrase gives that.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import secrets
import struct
import zlib
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from bastion.exceptions import DataLoss, InvalidArgument

__all__ = ["CHUNK_SIZE", "FORMAT_VERSION", "MAGIC", "TAG_SIZE"]

FORMAT_VERSION = 1
MAGIC = b"BSTNBAK1"
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
SALT_SIZE = 16
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024  # the most a header may make reading it cost (bastion writes 128 MiB)

_FLAG_ENCRYPTED = 1
_FLAG_ZLIB = 2
_HEADER = struct.Struct(">8sBBBBBBI16s")  # _magic, version, flags, log_n, r, p, reserved, chunk, salt
_HEADER_SIZE = _HEADER.size + 32


def _keys(passphrase: bytes, salt: bytes, log_n: int, r: int, p: int) -> tuple[bytes, bytes]:
    derived = Scrypt(salt=salt, length=64, n=2**log_n, r=r, p=p).derive(passphrase)
    return derived[:32], derived[32:]


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class _Sealer:
    """Seals and opens chunks: AES-256-GCM (encrypted) or a SHA-256 tag (plain)."""

    def __init__(self, header: bytes, key: bytes | None) -> None:
        self.header = header
        self.aead = AESGCM(key) if key is not None else None

    def seal(self, counter: int, last: bool, data: bytes) -> bytes:
        if self.aead is not None:
            return self.aead.encrypt(_nonce(counter, last), data, self.header)
        return data + self._tag(counter, last, data)

    def open(self, counter: int, last: bool, sealed: bytes) -> bytes:
        if self.aead is not None:
            try:
                return self.aead.decrypt(_nonce(counter, last), sealed, self.header)
            except InvalidTag:
                message = f"archive is corrupt or was tampered with (chunk {counter} fails to authenticate)"
                raise DataLoss(message) from None
        data, tag = sealed[:-TAG_SIZE], sealed[-TAG_SIZE:]
        if not hmac.compare_digest(tag, self._tag(counter, last, data)):
            raise DataLoss(f"archive is corrupt (chunk {counter} fails its checksum)")
        return data

    def _tag(self, counter: int, last: bool, data: bytes) -> bytes:
        return hashlib.sha256(self.header[-32:] + _nonce(counter, last) + data).digest()[:TAG_SIZE]


class _FramedWriter(io.RawIOBase):
    """A write-only stream: compresses, chunks and seals what is written into ``out``."""

    def __init__(self, out: BinaryIO, passphrase: bytes | None, log_n: int) -> None:
        flags = _FLAG_ZLIB | (_FLAG_ENCRYPTED if passphrase else 0)
        salt = secrets.token_bytes(SALT_SIZE)
        fields = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, log_n if passphrase else 0, 8, 1, 0, CHUNK_SIZE, salt)
        key = None
        if passphrase:
            key, mac_key = _keys(passphrase, salt, log_n, 8, 1)
            check = hmac.new(mac_key, fields, hashlib.sha256).digest()
        else:
            check = hashlib.sha256(fields).digest()
        self._sealer = _Sealer(fields + check, key)
        self._out = out
        self._zlib = zlib.compressobj(1)
        self._pending = bytearray()
        self._counter = 0
        self.digest = hashlib.sha256()
        self.size = 0
        self._emit(fields + check)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._pending += self._zlib.compress(view)
        while len(self._pending) > CHUNK_SIZE:  # keep one back: the last chunk must be flagged
            self._emit(self._sealer.seal(self._counter, False, bytes(self._pending[:CHUNK_SIZE])))
            del self._pending[:CHUNK_SIZE]
            self._counter += 1
        return len(view)

    def finish(self) -> None:
        self._pending += self._zlib.flush()
        while len(self._pending) > CHUNK_SIZE:
            self._emit(self._sealer.seal(self._counter, False, bytes(self._pending[:CHUNK_SIZE])))
            del self._pending[:CHUNK_SIZE]
            self._counter += 1
        self._emit(self._sealer.seal(self._counter, True, bytes(self._pending)))
        self._pending.clear()

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self.digest.update(data)
        self.size += len(data)


class _FramedReader(io.RawIOBase):
    """A read-only stream of the tar bytes inside an archive, checked chunk by chunk."""

    def __init__(self, src: BinaryIO, passphrase: bytes | None) -> None:
        raw = _read_exact(src, _HEADER_SIZE)
        if len(raw) < _HEADER_SIZE or not raw.startswith(MAGIC):
            raise DataLoss("not a bastion backup archive (bad header)")
        _magic, version, flags, log_n, r, p, _, chunk, salt = _HEADER.unpack(raw[: _HEADER.size])
        fields, check = raw[: _HEADER.size], raw[_HEADER.size :]
        if version != FORMAT_VERSION or not flags & _FLAG_ZLIB or not 1024 <= chunk <= 16 * 1024 * 1024:
            raise DataLoss(f"archive header is corrupt or from an unknown format (version {version})")
        self.encrypted = bool(flags & _FLAG_ENCRYPTED)
        key = None
        if self.encrypted:
            if not passphrase:
                raise InvalidArgument(
                    "this archive is encrypted: give its passphrase (BASTION_BACKUP_PASSPHRASE or a passphrase file)"
                )
            # Read before anything is authenticated: bound the memory (128 * r * n) and work a forged one costs.
            if not (10 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 4 and 128 * r << log_n <= MAX_SCRYPT_MEMORY):
                raise DataLoss("archive header is corrupt (key derivation parameters out of range)")
            key, mac_key = _keys(passphrase, salt, log_n, r, p)
            if not hmac.compare_digest(check, hmac.new(mac_key, fields, hashlib.sha256).digest()):
                raise InvalidArgument("wrong passphrase for this archive (or its header is damaged)")
        elif not hmac.compare_digest(check, hashlib.sha256(fields).digest()):
            raise DataLoss("archive header is corrupt (checksum mismatch)")
        self._sealer = _Sealer(raw, key)
        self._src = src
        self._piece = chunk + TAG_SIZE
        self._next = _read_exact(src, self._piece)
        self._counter = 0
        self._zlib = zlib.decompressobj()
        self._buffer = bytearray()
        self._last = False  # the last chunk has been opened
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        view = memoryview(target).cast("B")
        while not self._buffer and not self._done:
            self._fill()
        n = min(len(view), len(self._buffer))
        view[:n] = self._buffer[:n]
        del self._buffer[:n]
        return n

    def _fill(self) -> None:
        if not self._zlib.unconsumed_tail:
            sealed = self._next
            if self._last or len(sealed) < TAG_SIZE:
                raise DataLoss("archive is truncated")
            self._next = _read_exact(self._src, self._piece) if len(sealed) == self._piece else b""
            self._last = not self._next
            data = self._sealer.open(self._counter, self._last, sealed)
            self._counter += 1
        else:
            data = self._zlib.unconsumed_tail
        self._buffer += self._zlib.decompress(data, CHUNK_SIZE * 4)
        if self._last and not self._zlib.unconsumed_tail:
            if not self._zlib.eof or self._zlib.unused_data:
                raise DataLoss("archive is corrupt (compressed stream ends badly)")
            self._done = True

    def drain(self) -> None:
        """Read (and so check) everything left, through the authenticated last chunk."""
        while not self._done:
            self._buffer.clear()
            self._fill()
        self._buffer.clear()


def _read_exact(src: BinaryIO, n: int) -> bytes:
    parts = []
    while n > 0:
        part = src.read(n)
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)
