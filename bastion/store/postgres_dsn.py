"""PostgreSQL DSNs: ``redact_dsn`` for what is shown, and what libpq accepts in a URI.

A DSN may carry a password (in its authority or a ``password=``
parameter): ``redact_dsn`` is how ``PostgresStore`` shows one in ``repr``
and messages. ``_LIBPQ_PARAMETERS`` and ``_pgoptions_escape`` let
``PostgresStore.libpq_connection`` split a DSN's query into libpq's
connection parameters and server settings (sent in ``PGOPTIONS``).
"""

from __future__ import annotations

import urllib.parse

__all__ = ["redact_dsn"]


#: Connection parameters libpq accepts in a URI; the DSN's other query parameters are server settings.
_LIBPQ_PARAMETERS = frozenset(
    {
        "host", "hostaddr", "port", "dbname", "user", "passfile", "channel_binding", "connect_timeout",
        "client_encoding", "options", "application_name", "fallback_application_name", "keepalives",
        "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout", "sslmode",
        "sslcompression", "sslcert", "sslkey", "sslpassword", "sslrootcert", "sslcrl", "sslcrldir", "sslsni",
        "requirepeer", "ssl_min_protocol_version", "ssl_max_protocol_version", "gssencmode", "krbsrvname",
        "gsslib", "service", "target_session_attrs", "load_balance_hosts",
    }
)  # fmt: skip


def _pgoptions_escape(value: str) -> str:
    """A value for ``PGOPTIONS`` (backslash escapes spaces and backslashes)."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password (in the authority or a ``password=`` parameter) replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return "<unparsable DSN>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hosts}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(key.lower() == "password" for key, _ in pairs):
            query = urllib.parse.urlencode(
                [(key, "***" if key.lower() == "password" else value) for key, value in pairs], safe="*"
            )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
