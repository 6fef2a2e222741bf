"""The gateway's raw-body route for bytes client streams (what the console's uploads use), without a browser.

``POST /v1/files/upload?upload_id=&offset=`` with ``application/octet-stream``:
the query string is the arguments, the body the stream. Checked over real
HTTPS against ``bastion serve``: an upload in several requests, resuming at
the offset the server holds, and the coded refusals.
"""

from __future__ import annotations

import hashlib
import http.client
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

import bastion
from bastion.client.sync import SyncClient
from tests.browser.conftest import ConsoleWorld
from tests.support.server import shared_ca


def post(world: ConsoleWorld, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(shared_ca()))
    request = urllib.request.Request(world.url + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20, context=context) as response:
            return response.status, msgspec.json.decode(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, msgspec.json.decode(exc.read())


def octets(world: ConsoleWorld) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.token}", "Content-Type": "application/octet-stream"}


def test_upload_in_requests_with_resume_and_refusals(console_world: ConsoleWorld) -> None:
    data = bytes(range(256)) * 3000  # 768000 bytes: two requests
    with SyncClient(console_world.native, token=console_world.token, timeout=30) as native:
        info = native.call(
            "files.begin_upload", name="raw.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
        upload = info["upload_id"]
        status, first = post(
            console_world, f"/v1/files/upload?upload_id={upload}&offset=0", data[:500_000], octets(console_world)
        )
        assert status == 200 and first["offset"] == 500_000 and first["complete"] is False
        # The wrong offset: refused, naming the one to continue from; nothing is lost.
        status, wrong = post(
            console_world, f"/v1/files/upload?upload_id={upload}&offset=0", data[500_000:], octets(console_world)
        )
        assert status == 400 and wrong["error"]["status"] == "FAILED_PRECONDITION"
        assert "continue from offset 500000" in wrong["error"]["message"]
        # A bad argument in the query string.
        status, bad = post(console_world, f"/v1/files/upload?upload_id={upload}&offset=x", b"", octets(console_world))
        assert status == 400 and bad["error"]["status"] == "INVALID_ARGUMENT"
        # No credentials: the server's own UNAUTHENTICATED (the method is not public).
        anonymous = {"Content-Type": "application/octet-stream"}
        status, denied = post(console_world, f"/v1/files/upload?upload_id={upload}&offset=500000", b"x", anonymous)
        assert status == 401 and denied["error"]["status"] == "UNAUTHENTICATED"
        # A session cookie without the CSRF header is refused before anything is read.
        cookie = {"Cookie": "__Host-bastion_session=whatever", "Content-Type": "application/octet-stream"}
        status, csrf = post(console_world, f"/v1/files/upload?upload_id={upload}&offset=500000", b"x", cookie)
        assert status == 403 and csrf["error"]["status"] == "PERMISSION_DENIED"
        status, done = post(
            console_world, f"/v1/files/upload?upload_id={upload}&offset=500000", data[500_000:], octets(console_world)
        )
        assert status == 200 and done["complete"] is True and done["file"]["size"] == len(data)
        got = b"".join(native.stream("files.download", name="raw.bin"))
        assert got == data
        # A body over max_body (1 MiB by default) is refused with 413 before it is read.
        status, big = post(
            console_world, f"/v1/files/upload?upload_id={upload}&offset=0", b"\0" * (2 << 20), octets(console_world)
        )
        assert status == 413 and big["error"]["status"] == "RESOURCE_EXHAUSTED"
        # Without the octet-stream content type a client stream is still not carried.
        json_headers = {"Authorization": f"Bearer {console_world.token}", "Content-Type": "application/json"}
        status, json_body = post(console_world, "/v1/files/upload", b'{"upload_id": "x"}', json_headers)
        assert status == 404 and json_body["error"]["status"] == "UNIMPLEMENTED"


def test_a_chunked_body_past_the_limit_is_answered_413_and_the_upload_continues(console_world: ConsoleWorld) -> None:
    data = bytes(range(251)) * 6000  # 1506000 bytes, more than one request's 1 MiB
    with SyncClient(console_world.native, token=console_world.token, timeout=30) as native:
        info = native.call(
            "files.begin_upload", name="chunked.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
        upload = info["upload_id"]
        host, port = console_world.url.removeprefix("https://").rsplit(":", 1)
        conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=str(shared_ca())))
        pieces = (data[i : i + 65536] for i in range(0, len(data), 65536))
        conn.request(
            "POST",
            f"/v1/files/upload?upload_id={upload}&offset=0",
            body=pieces,
            headers=octets(console_world),
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 413
        assert msgspec.json.decode(response.read())["error"]["status"] == "RESOURCE_EXHAUSTED"
        conn.close()
        # What arrived before the limit was kept, as after a dropped connection: continue from there.
        held = native.call("files.upload_status", upload_id=upload)["offset"]
        assert 0 < held <= 1 << 20
        status, done = post(
            console_world, f"/v1/files/upload?upload_id={upload}&offset={held}", data[held:], octets(console_world)
        )
        assert status == 200 and done["complete"] is True
        assert b"".join(native.stream("files.download", name="chunked.bin")) == data


def test_the_console_served_is_the_one_under_test(console_world: ConsoleWorld) -> None:
    """The server the browser tests start runs this checkout's bastion, not another one installed."""
    context = ssl.create_default_context(cafile=str(shared_ca()))
    with urllib.request.urlopen(console_world.url + "/static/app.js", timeout=20, context=context) as response:
        served = response.read()
    assert served == (Path(bastion.__file__).parent / "gateway" / "static" / "app.js").read_bytes()
