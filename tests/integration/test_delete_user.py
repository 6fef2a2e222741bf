"""``auth.delete_user`` on a running ``bastion serve`` hands a user's data over, or deletes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion import SyncClient
from bastion.exceptions import NotFound
from tests.support.server import ServerProcess, bastion_cli


def _user(server: ServerProcess, name: str, tmp_path: Path) -> Path:
    """Create ``name``; a file holding their token."""
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
        root.auth.create_user(name=name)
        token = root.auth.create_token(user=name)["token"]
    path = tmp_path / f"{name}.token"
    path.write_text(token)
    path.chmod(0o600)
    return path


def _own_data(server: ServerProcess, name: str, tmp_path: Path) -> Path:
    """Create ``name`` with a key and a file of their own; their token file."""
    token = _user(server, name, tmp_path)
    with SyncClient(server.address, token_file=str(token), timeout=10) as client:
        client.kv.put(key="notes", value=f"{name}'s notes".encode())
    source = tmp_path / f"{name}.txt"
    source.write_bytes(f"{name}'s file".encode())
    out = bastion_cli("files", "put", server.address, str(source), "report.txt", "--token-file", str(token))
    assert out.returncode == 0, out.stderr
    return token


def test_delete_user_hands_keys_and_files_to_the_heir(server: ServerProcess, tmp_path: Path) -> None:
    _own_data(server, "bob", tmp_path)
    alice = _user(server, "alice", tmp_path)
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
        deleted = root.auth.delete_user(name="bob", transfer_to="alice")
    assert deleted["transferred_to"] == "alice"
    assert deleted["items"]["kv"] >= 1 and deleted["items"]["files"] == 1
    with SyncClient(server.address, token_file=str(alice), timeout=10) as client:
        assert client.kv.get(key="from-bob/notes")["value"] == b"bob's notes"
        [info] = client.files.list()["files"]
        assert (info["owner"], info["name"]) == ("alice", "report.txt")
    got = tmp_path / "got.txt"
    out = bastion_cli("files", "get", server.address, "report.txt", str(got), "--token-file", str(alice))
    assert out.returncode == 0, out.stderr
    assert got.read_bytes() == b"bob's file"


def test_delete_user_without_heir_deletes_their_data(server: ServerProcess, tmp_path: Path) -> None:
    _own_data(server, "carol", tmp_path)
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
        deleted = root.auth.delete_user(name="carol")
        assert deleted["items"]["kv"] >= 1 and deleted["items"]["files"] == 1
        with pytest.raises(NotFound):
            root.kv.get(key="notes", namespace="~carol")
        assert root.files.list(all=True)["files"] == []
