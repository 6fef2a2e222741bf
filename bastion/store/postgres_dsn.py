"""PostgreSQL DSNs: ``redact_dsn`` for what is shown, and what libpq accepts in a URI.

A DSN may carry a password (in its authority or a ``password=``
parameter; an encrypted client key's passphrase in ``sslpassword=``):
``redact_dsn`` is how ``PostgresStore`` shows one in ``repr`` and messages.
``_LIBPQ_PARAMETERS`` and ``_pgoptions_escape`` let
``PostgresStore.libpq_connection`` split a DSN's query into libpq's
connection parameters and server settings (sent in ``PGOPTIONS``).
"""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["SECRET_PARAMETERS", "redact_dsn"]


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


#: Query parameters of a DSN that hold a secret: the password, and the passphrase of an encrypted client key.
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***``: the authority's (``user:***@host``) and the values of
    ``password`` and ``sslpassword`` parameters.

    Read by hand, not by ``urlsplit``: a password with a reserved character it should have percent-encoded
    (``s3/cret``, ``s3?cret``, ``s3#cret``, ``s3@cret``) makes ``urlsplit`` end a part inside it, which
    then showed. So the secret parameters go first, wherever they are: each value runs to where another
    parameter (``&name=``) begins, or to the end. Then the userinfo ends at the last ``@`` left (as wherever
    such a DSN is meant). Both err towards hiding too much.
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return "<DSN not shown>" if "password" in dsn.lower() else dsn
    rest = _PARAMETER.sub(_hide_secret, rest)
    userinfo, at, location = rest.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}://{userinfo}{at}{location}"


#: A query parameter: its separator, its name, and its value up to the next ``&name=`` or the end.
_PARAMETER = re.compile(r"([?&])([^&=?#@/]*)=(.*?)(?=&[^&=]*=|$)", re.DOTALL)


def _hide_secret(parameter: re.Match[str]) -> str:
    if urllib.parse.unquote(parameter[2]).lower() in SECRET_PARAMETERS:
        return f"{parameter[1]}{parameter[2]}=***"
    return parameter[0]
