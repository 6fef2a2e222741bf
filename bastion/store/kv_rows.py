"""The multi-row statements of the SQLite kv store's batched puts (``_SQLiteTx.put_rows`` in kv_sqlite.py)."""

from __future__ import annotations

import functools

from bastion.store.kv import LOG_COLUMNS, PUT

__all__ = ["COPY_MAX", "KEY_UPSERT_HEAD", "KEY_UPSERT_TAIL", "MAX_CHUNK_BYTES", "MAX_ROWS", "rows_sql"]

KEY_UPSERT_HEAD = "INSERT INTO kv_keys (namespace, key, value, content_type, version, expires_at) VALUES "
KEY_UPSERT_TAIL = (
    " ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, content_type = excluded.content_type, "
    "version = excluded.version, expires_at = excluded.expires_at"
)
LOG_INSERT_HEAD = f"INSERT INTO kv_log ({LOG_COLUMNS}) VALUES "
# A row of each, for a put with a content type or an expiry, and for a plain put (neither: its
# '' and NULL written into the statement, two parameters fewer per table). @ is the row's revision
# (?1, the chunk's first revision, plus the row's place); # its namespace.
_KEY_ROW, _KEY_ROW_PLAIN = "(#, ?, ?, ?, @, ?)", "(#, ?, ?, '', @, NULL)"
_LOG_ROW, _LOG_ROW_PLAIN = f"(@, #, ?, '{PUT}', ?, ?, ?)", f"(@, #, ?, '{PUT}', ?, '', ?)"
# The most rows one statement of put_rows writes: a batch is cut into chunks of powers of two up to
# this, so the connection caches at most 2 x 4 x 7 statements for them.
MAX_ROWS = 64
# The most value bytes one chunk of put_rows writes (unless one value is more): the writer keeps
# statement journals in memory (temp_store=MEMORY), and an upsert overwriting 64 large values would
# hold them all there at once -- tens of MiB. Chunks of large values are cut in halves until they fit.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
# The largest value put_rows binds as a bytearray copy rather than as the bytes themselves (the
# copy costs about what the two adapter lookups it saves do at some tens of KiB).
COPY_MAX = 4096


@functools.cache
def rows_sql(n: int, plain: bool, shared: bool) -> tuple[str, str]:
    """The upsert and the log insert of ``n`` puts, one statement each (see kv_sqlite.py's put_rows).

    Their parameters: the first revision (``?1``), then, if ``shared``, the namespace of every row
    (``?2``), then each row's own in order.
    """
    key_row, log_row = (_KEY_ROW_PLAIN, _LOG_ROW_PLAIN) if plain else (_KEY_ROW, _LOG_ROW)
    key_sql = KEY_UPSERT_HEAD + _numbered(key_row, n, shared) + KEY_UPSERT_TAIL
    return key_sql, LOG_INSERT_HEAD + _numbered(log_row, n, shared)


def _numbered(row: str, n: int, shared: bool) -> str:
    """``n`` rows of ``row``, its parameters numbered: @ is ``?1 + i`` in row i (from 0), # ``?2`` if
    ``shared`` (else a parameter of the row's own), and each ``?`` the next number."""
    rows, number = [], 3 if shared else 2
    for i in range(n):
        parts = []
        for c in row:
            if c == "@":
                parts.append(f"?1 + {i}")
            elif c == "#" and shared:
                parts.append("?2")
            elif c in "#?":
                parts.append(f"?{number}")
                number += 1
            else:
                parts.append(c)
        rows.append("".join(parts))
    return ", ".join(rows)
