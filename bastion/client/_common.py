"""What the async and the sync client share: addresses, handshake, results, proxies.

Both clients drive the same sans-IO ``Connection``; this module holds every
decision that does not depend on how bytes move, so the two stay one logic
with two thin transports.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from bastion._version import __version__
from bastion.client.policy import NotStarted
from bastion.exceptions import CallError, RemoteProtocolError, Unavailable, UsageError, error_for_status
from bastion.protocol.connection import ProtocolLimits
from bastion.protocol.messages import DEFAULT_PORT, PROTOCOL_VERSION, Error, GoAway, Hello
from bastion.security.tls import client_context
from bastion.status import Status

__all__ = [
    "COLLECTED_ITEM_COST",
    "MAX_COLLECTED_BYTES",
    "MAX_PINGS",
    "PING_WINDOW",
    "VALUE_ERRORS",
    "ClientTLS",
    "MethodProxy",
    "PingMeter",
    "ServiceProxy",
    "bad_value",
    "build_hello",
    "collected_too_much",
    "decode_value",
    "error_from",
    "parse_address",
]

#: Decodes a call's raw answer (or stream item) to plain values.
DECODER: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()
CLIENT_NAME = f"bastion-py/{__version__}"

#: The default of ``max_collected_bytes``: the most a unary call (``call``, ``invoke``) collects of a
#: server stream's items before it fails -- as much as ``stream()`` may hold unread (16 items of 1 MiB).
MAX_COLLECTED_BYTES = 16 * 1024 * 1024
#: What each collected item counts besides its bytes (its object and its place in the queue and the
#: list): a stream of tiny items is bounded too.
COLLECTED_ITEM_COST = 64
#: Pings a server may send on one connection in ``PING_WINDOW`` seconds before the client drops it: each
#: costs the client a Pong, which piles up unsent if the server does not read (the server's own cap on
#: clients, ``limits.max_pings_per_10s``, is the same). A server's keepalive pings every ~30 s.
MAX_PINGS = 100
PING_WINDOW = 10.0


class PingMeter:
    """The Pings a server sent on one connection lately, against ``MAX_PINGS`` per ``PING_WINDOW`` seconds.

    Both clients keep one per connection and ask it about each read's Pings
    before their Pongs are sent (``clock``: the async client's loop time, the
    sync client's ``time.monotonic``).
    """

    __slots__ = ("clock", "count", "since")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.count = 0  # Pings since ``since``
        self.since = clock()

    def received(self, n: int = 1) -> str | None:
        """Count ``n`` Pings just received; why the connection must be dropped, if they make a flood."""
        now = self.clock()
        if now - self.since >= PING_WINDOW:
            self.since, self.count = now, 0
        self.count += n
        if self.count > MAX_PINGS:
            return f"ping flood: the server sent over {MAX_PINGS} Pings in {PING_WINDOW:g}s"
        return None


def collected_too_much(limit: int) -> RemoteProtocolError:
    """The error of a unary call whose server stream passed ``max_collected_bytes`` (``limit``)."""
    return RemoteProtocolError(
        f"the server's stream passed max_collected_bytes ({limit}) in answer to a call that collects it into "
        "one list: the call was cancelled (read a long stream with stream())",
        Status.RESOURCE_EXHAUSTED,
    )


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``:port``, ``host``, ``[v6]:port`` or ``bastion://host:port``."""
    text = address.strip()
    for scheme in ("bastion://", "bastions://", "tcp://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    text = text.rstrip("/")
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or not host or (rest and not rest.startswith(":")):
            raise UsageError(f"bad address {address!r}: expected [IPV6]:PORT or [IPV6]")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    host = host or "127.0.0.1"
    if not port_text:
        return host, DEFAULT_PORT
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"bad address {address!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise UsageError(f"bad address {address!r}: port out of range")
    return host, port


def resolve_token(token: str | None, token_file: str | os.PathLike[str] | None) -> str | None:
    """The token to present: explicit, from a file, or from BASTION_TOKEN(_FILE)."""
    if token is not None and token_file is not None:
        raise UsageError("give token= or token_file=, not both")
    if token is None and token_file is None:
        token = os.environ.get("BASTION_TOKEN") or None
        token_file = os.environ.get("BASTION_TOKEN_FILE") or None
    if token is None and token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read token file {token_file}: {exc.strerror}") from None
        except UnicodeDecodeError:  # said without the bytes: they are a secret
            raise UsageError(f"token file {token_file} is not UTF-8 text") from None
    return token


class ClientTLS:
    """How a client secures its connections, decided once at construction.

    TLS unless ``insecure``: an explicit ``ssl_context`` wins; else the server
    is verified against ``ca`` (or the file named by ``BASTION_CA``), else
    against the system trust store; ``cert``/``key`` add a client
    certificate. The context is built on first use (in-memory clients never
    need one).
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        insecure: bool = False,
    ) -> None:
        if insecure and (ssl_context is not None or ca is not None or cert is not None or key is not None):
            raise UsageError("insecure=True means plaintext: do not also give ssl_context=, ca=, cert= or key=")
        if ssl_context is not None and (ca is not None or cert is not None or key is not None):
            raise UsageError("give ssl_context= or ca=/cert=/key=, not both")
        if key is not None and cert is None:
            raise UsageError("key= needs cert=")
        self.insecure = insecure
        self.ca = ca if ca is not None or insecure or ssl_context is not None else os.environ.get("BASTION_CA") or None
        self.cert, self.key = cert, key
        self._context = ssl_context

    def context(self) -> ssl.SSLContext | None:
        """The client SSLContext, or None for plaintext."""
        if self.insecure:
            return None
        if self._context is None:
            self._context = client_context(self.ca, self.cert, self.key)
        return self._context


def silent_close_hint(tls: ClientTLS) -> str:
    """What to add when the server closed a connection in the handshake without a word.

    Plaintext: it is probably a TLS server. TLS: asyncio servers drop the
    TLS alert that would say why a client certificate was refused, so the
    close itself is the only sign.
    """
    if tls.insecure:
        return "; the server may require TLS (this client is plaintext: insecure=True / --insecure)"
    if tls.cert is not None:
        return (
            "; the server closed the connection right after TLS: it may have refused the client certificate "
            "(revoked, expired, or from a CA it does not trust)"
        )
    return (
        "; the server closed the connection right after TLS: it may require a client certificate "
        "(cert= and key=, --cert and --key)"
    )


def build_hello(limits: ProtocolLimits, token: str | None, name: str) -> Hello:
    return Hello(version=PROTOCOL_VERSION, client=name, token=token, window=limits.window, max_frame=limits.max_frame)


#: What decoding a value the server sent may raise besides the value: msgspec's DecodeError (a ValueError),
#: UnicodeDecodeError (a ValueError too) for a str that is not UTF-8 -- the frame decoder only skips over
#: a ``Raw`` field, so it lets both through -- and RecursionError for a value nested too deeply.
VALUE_ERRORS = (ValueError, RecursionError)


def bad_value(method: str, exc: BaseException) -> RemoteProtocolError:
    """The error for an answer (or stream item) of ``method`` that does not decode: the server broke the protocol.

    Only that call fails: the frame around the value was whole, so the
    connection stays in step and serves the client's other calls (as the
    server fails just the call whose arguments do not decode).
    """
    reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
    return RemoteProtocolError(f"{method}: the server's answer is not valid MessagePack ({reason})")


def decode_value(raw: msgspec.Raw, method: str) -> Any:
    """A value the server sent for ``method``'s call; RemoteProtocolError if it does not decode."""
    try:
        return DECODER.decode(raw)
    except VALUE_ERRORS as exc:
        raise bad_value(method, exc) from None


def error_from(message: Error) -> CallError:
    retry = message.retry_after_ms / 1000 if message.retry_after_ms is not None else None
    details = message.details if isinstance(message.details, dict) else None
    return error_for_status(message.code, message.message, details=details, retry_after=retry)


def goaway_error(goaway: GoAway | None, call_id: int | None = None) -> CallError:
    """The error for a call the server will not process after ``goaway``."""
    reason = goaway.message if goaway is not None and goaway.message else "server is going away"
    if goaway is not None and goaway.code not in (0, 14):  # not OK/UNAVAILABLE: the reason is the error
        return error_for_status(goaway.code, reason)
    if call_id is not None:
        return NotStarted(f"call {call_id} was not started ({reason}); it is safe to retry", retry_after=0)
    return Unavailable(reason)


def check_args(args: Mapping[str, Any] | None) -> dict[str, Any]:
    if args is None:
        return {}
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise UsageError("arguments must be a mapping of names to values")
    return dict(args)


class _Caller(Protocol):
    def call(self, method: str, /, **args: Any) -> Any: ...

    def stream(self, method: str, items: Any = None, /, **args: Any) -> Any: ...

    def upload(self, method: str, items: Any, /, **args: Any) -> Any: ...


C = TypeVar("C", bound=_Caller)


class MethodProxy(Generic[C]):
    """``client.svc.method``: call it, or use ``.stream`` / ``.upload``."""

    __slots__ = ("_caller", "_name")

    def __init__(self, caller: C, name: str) -> None:
        self._caller = caller
        self._name = name

    def __call__(self, **args: Any) -> Any:
        return self._caller.call(self._name, **args)

    def stream(self, items: Any = None, /, **args: Any) -> Any:
        return self._caller.stream(self._name, items, **args)

    def upload(self, items: Any, /, **args: Any) -> Any:
        return self._caller.upload(self._name, items, **args)

    def __repr__(self) -> str:
        return f"<method {self._name}>"


class ServiceProxy(Generic[C]):
    """``client.svc``: attribute access names a method."""

    __slots__ = ("_caller", "_service")

    def __init__(self, caller: C, service: str) -> None:
        self._caller = caller
        self._service = service

    def __getattr__(self, name: str) -> MethodProxy[C]:
        if name.startswith("_"):
            raise AttributeError(name)
        return MethodProxy(self._caller, f"{self._service}.{name}")

    def __repr__(self) -> str:
        return f"<service {self._service}>"
