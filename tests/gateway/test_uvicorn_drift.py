"""The gateway's HTTP protocol feeds uvicorn's httptools parser itself (bastion/gateway/_protocol.py, ``_feed``):
a copy of ``HttpToolsProtocol.data_received`` with budgeted refusal logs. A uvicorn release that changes that
method would leave the copy behind without a word; this test says so instead (pyproject.toml caps uvicorn below
the next minor release for the same reason)."""

from __future__ import annotations

import hashlib
import inspect
import textwrap

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: sha256 of uvicorn 0.54.0's ``HttpToolsProtocol.data_received``, dedented: the code ``_feed`` follows.
FOLLOWED = "02c2572f1df559070eba7f206a3f7e251782f5af4aaae194fc1ffb67f24c3873"


def test_the_uvicorn_code_the_gateway_follows_is_unchanged() -> None:
    source = textwrap.dedent(inspect.getsource(HttpToolsProtocol.data_received))
    assert hashlib.sha256(source.encode()).hexdigest() == FOLLOWED, (
        "uvicorn's HttpToolsProtocol.data_received changed: compare it with _feed in bastion/gateway/_protocol.py, "
        "carry the change over, then update FOLLOWED (and the uvicorn cap in pyproject.toml)\n" + source
    )
