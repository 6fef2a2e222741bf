"""The first start's admin credential: the ``admin`` user and its API token in ``admin.token``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bastion.exceptions import UsageError
from bastion.security.authn import hash_token, new_token, new_token_id
from bastion.security.credentials import Token, User
from bastion.security.principal import ADMIN_ROLE
from bastion.security.secret_files import open_secret_file, write_secret_file
from bastion.store import Store

__all__ = ["bootstrap_admin", "token_banner"]


def _tighten(path: Path) -> bool:
    """Make an existing secret file 0600; whether it exists. A symlink or another user's file is left as it is
    (a server run as root on a data directory its service user owns): refused only if it must be written."""
    try:
        fd = open_secret_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except UsageError:
        return True
    os.close(fd)
    return True


async def bootstrap_admin(store: Store, path: Path) -> str:
    """On an empty store: create the ``admin`` user and its API token in ``path`` (0600).

    ``path`` is never written through a symbolic link, nor if another user owns it (UsageError:
    bastion/security/secret_files.py): a data directory others could write to may hold a planted one.

    The token file is written before the store is touched, so a start that cannot write it leaves the
    store empty; and a store holding only a bootstrap ``admin`` that never got a token (a start stopped
    between the two writes) is finished by the next one. Otherwise a retry would find a user and do
    nothing, leaving an ``admin`` without password or token: a server nobody could administer.

    Returns how ``path`` relates to this start: "written to", "in" or "not in".
    """
    exists = _tighten(path)
    users = await store.list_users()
    if users and not (_bootstrap_admin_only(users) and not await store.list_tokens("admin")):
        return "in" if exists else "not in"
    now = time.time()
    token = new_token()
    write_secret_file(path, (token + "\n").encode())
    if not users:
        await store.create_user(User("admin", frozenset({ADMIN_ROLE}), None, now))
    await store.add_token(Token(new_token_id(), hash_token(token), "admin", "api", "bootstrap", now))
    return "written to"


def token_banner(state: str, path: Path) -> str:
    """The banner's line for ``bootstrap_admin``'s answer ``state`` about the token file ``path``."""
    if state == "not in":
        return (
            f"admin token: none in {path} (only a first start, on a store without users, writes one): "
            "use an admin's token, e.g. from the data directory of the server that first used this store"
        )
    return f"admin token {state} {path} (mode 0600)"


def _bootstrap_admin_only(users: list[User]) -> bool:
    """Whether ``users`` is the bootstrap's ``admin`` alone, as it creates it (no password)."""
    return len(users) == 1 and users[0].name == "admin" and users[0].password_hash is None and not users[0].disabled
