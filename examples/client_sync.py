"""Call the greeter service (examples/greeter.py) with the blocking client.

Start a server first, from the repository root::

    bastion serve --service examples.greeter:service

then::

    python examples/client_sync.py [ADDRESS] [TOKEN_FILE]

ADDRESS defaults to $BASTION_ADDRESS, else 127.0.0.1:7400; TOKEN_FILE to
$BASTION_TOKEN_FILE, else bastion-data/admin.token (written by ``bastion
serve`` on first start) if it exists; without a token only the public
``hello`` works. The server's certificate is verified against $BASTION_CA,
else bastion-data/tls/ca.pem (the development CA) if it exists.
"""

from __future__ import annotations

import os
import sys

from bastion import BastionError, SyncClient

DEFAULT_TOKEN_FILE = "bastion-data/admin.token"
#: The development CA ``bastion serve`` creates on first start (the server's TLS certificate chains to it).
DEFAULT_CA = "bastion-data/tls/ca.pem"


def settings(argv: list[str]) -> tuple[str, str | None]:
    """The address and token file to use, from argv, then the environment, then defaults."""
    address = argv[1] if len(argv) > 1 else os.environ.get("BASTION_ADDRESS", "127.0.0.1:7400")
    token_file = argv[2] if len(argv) > 2 else os.environ.get("BASTION_TOKEN_FILE")
    if token_file is None and os.path.exists(DEFAULT_TOKEN_FILE):
        token_file = DEFAULT_TOKEN_FILE
    return address, token_file


def local_ca() -> str | None:
    """The CA to verify the server with: $BASTION_CA (read by the client), else the local dev CA if present."""
    return DEFAULT_CA if not os.environ.get("BASTION_CA") and os.path.exists(DEFAULT_CA) else None


def main(address: str, token_file: str | None) -> None:
    with SyncClient(address, token_file=token_file, timeout=10, ca=local_ca()) as client:
        print(client.greeter.hello(name="sync world", times=2))
        print("2 + 3 =", client.greeter.add(a=2, b=3))
        for i in client.stream("greeter.count", n=5):
            print("count:", i)
        print("uploaded", client.greeter.total.upload(bytes(1000 * i) for i in range(10)), "bytes")


if __name__ == "__main__":
    try:
        main(*settings(sys.argv))
    except BastionError as exc:
        sys.exit(f"error: {type(exc).__name__}: {exc}")
