"""Password hashing: argon2id through argon2-cffi, timing-equal for unknown users.

Hashing costs ~0.1 s of CPU and 64 MiB by design, so verification runs in a
thread and at most ``concurrency`` at once; a flood of logins queues instead
of exhausting memory. ``verify`` for a user that does not exist still hashes
(against a fixed dummy) so "no such user" and "wrong password" take the same
time and give the same answer. A stored hash made with other parameters
(a cost raised since, an argon2-cffi upgrade) is replaced at the user's
next successful login (``needs_rehash``). Passwords are hashed and compared
in Unicode NFC (RFC 8265), whatever form a client's keyboard produced.
"""

from __future__ import annotations

import asyncio
import unicodedata

import argon2

__all__ = ["PasswordHasher"]

MIN_LENGTH = 8
MAX_LENGTH = 1024


class PasswordHasher:
    def __init__(self, *, concurrency: int = 4, fast: bool = False) -> None:
        # ``fast`` is for tests only: cheap parameters, same algorithm.
        self._hasher = (
            argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1) if fast else argon2.PasswordHasher()
        )
        self._dummy = self._hasher.hash("bastion-dummy-password")
        self._slots = asyncio.Semaphore(concurrency)

    @staticmethod
    def normalize(password: str) -> str:
        """The form a password is hashed and compared in: NFC (RFC 8265), so "é" composed on one system
        and decomposed on another is one password. Past 4 x MAX_LENGTH it is too long anyway: left as is."""
        return password if len(password) > 4 * MAX_LENGTH else unicodedata.normalize("NFC", password)

    @staticmethod
    def check_policy(password: str) -> str | None:
        """Why ``password`` is unacceptable, or None (its length counted in characters, normalised)."""
        password = PasswordHasher.normalize(password)
        if len(password) < MIN_LENGTH:
            return f"password must have at least {MIN_LENGTH} characters"
        if len(password) > MAX_LENGTH:
            return f"password must have at most {MAX_LENGTH} characters"
        return None

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, self.normalize(password))

    async def verify(self, stored: str | None, password: str) -> bool:
        """True if ``password`` matches ``stored``; constant work when ``stored`` is None."""
        return (await self.verify_login(stored, password))[0]

    async def verify_login(self, stored: str | None, password: str) -> tuple[bool, bool]:
        """Whether ``password`` matches ``stored``, and whether ``stored`` should then be replaced by a
        fresh hash (made with other parameters, or of a password stored before normalisation)."""
        async with self._slots:
            return await asyncio.to_thread(self._verify, stored, password)

    def needs_rehash(self, stored: str) -> bool:
        """Whether ``stored`` was hashed with other parameters than this hasher's (or is no argon2 hash)."""
        try:
            return self._hasher.check_needs_rehash(stored)
        except (argon2.exceptions.InvalidHashError, ValueError):
            return True

    def _verify(self, stored: str | None, password: str) -> tuple[bool, bool]:
        normal = self.normalize(password)
        if self._attempt(stored, normal) and stored is not None:  # (no stored hash: the dummy's work, False)
            return True, self.needs_rehash(stored)
        # A hash stored before passwords were normalised is of the password as it was sent. The second try
        # is made for a user that does not exist too, so the two still take the same time.
        if normal != password and self._attempt(stored, password):
            return True, True
        return False, False

    def _attempt(self, stored: str | None, password: str) -> bool:
        # No stored password is longer than MAX_LENGTH (check_policy), so a longer one is wrong; it is
        # cut for the work (bounded) but checked against the dummy, never passing as its first part.
        too_long = len(password) > MAX_LENGTH
        try:
            ok = self._hasher.verify(self._dummy if too_long else stored or self._dummy, password[:MAX_LENGTH])
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
        return ok and stored is not None and not too_long
