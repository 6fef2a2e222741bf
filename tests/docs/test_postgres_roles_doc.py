"""docs/services.md, "An application role beside the schema's owner": its SQL, run on PostgreSQL, does what it says.

The SQL block is taken from the doc, its role and schema names replaced by
fresh ones: an owner that migrates a schema made by an older bastion, and an
application role given the documented rights. After the owner migrates to
the latest schema and one more (a table with an identity column, as a later
release would add), the application role may read and write every table and
sequence, including those the migrations made after the SQL ran, and a
server's store opened as that role sends a message (tables of migration 7).
A control role given only the doc's GRANT ... ON ALL lines, without the
default privileges, has no rights on those new tables: the default
privileges are what gives them.
"""

from __future__ import annotations

import re
import secrets
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import msgspec
import pytest

from bastion.security.credentials import User
from bastion.store.mail import MailDraft, MailLimits
from bastion.store.migrations import Migration
from bastion.store.postgres import PostgresStore
from bastion.store.postgres_migrations import POSTGRES_MIGRATIONS
from tests.support.stores import POSTGRES_DSN_ENV, postgres_dsn, run_sync

DOC = Path(__file__).resolve().parents[2] / "docs" / "services.md"
SECTION = "**An application role beside the schema's owner.**"
#: The schema an older bastion made: before the messages tables (migration 7) and everything after.
OLD = 6
#: A later release's migration: one more table, with an identity column (so a sequence too).
LATER = Migration(
    POSTGRES_MIGRATIONS[-1].version + 1,
    "notes",
    ("CREATE TABLE notes (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body TEXT)",),
    compatible=True,
)


def documented_sql() -> list[str]:
    """The statements of the section's ``sql`` block, comments dropped."""
    text = DOC.read_text()
    found = re.search(r"```sql\n(.*?)```", text[text.index(SECTION) :], re.S)
    assert found is not None, f"no sql block after {SECTION}"
    lines = [line for line in found[1].splitlines() if not line.lstrip().startswith("--")]
    return [statement.strip() for statement in " ".join(lines).split(";") if statement.strip()]


def renamed(statement: str, owner: str, app: str, schema: str) -> str:
    statement = re.sub(r"\bbastion_owner\b", f'"{owner}"', statement)
    statement = re.sub(r"\bbastion_app\b", f'"{app}"', statement)
    statement = re.sub(r"\bSCHEMA bastion\b", f'SCHEMA "{schema}"', statement)
    assert "bastion" not in statement, statement  # a name the doc uses that this test does not know
    return statement


def as_role(role: str, password: str, schema: str) -> str:
    parts = urllib.parse.urlsplit(postgres_dsn())
    query = urllib.parse.urlencode({"search_path": schema})
    return urllib.parse.urlunsplit(
        parts._replace(netloc=f"{role}:{password}@{parts.netloc.rpartition('@')[2]}", query=query)
    )


async def execute(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def lacking(role: str, schema: str) -> set[str]:
    """The tables (DML) and sequences (USAGE, SELECT) in ``schema`` on which ``role`` lacks those rights."""
    conn = await asyncpg.connect(postgres_dsn(), timeout=10)
    try:
        rows = await conn.fetch(
            """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = $2 AND CASE c.relkind
                 WHEN 'r' THEN NOT (has_table_privilege($1, c.oid, 'SELECT')
                                    AND has_table_privilege($1, c.oid, 'INSERT')
                                    AND has_table_privilege($1, c.oid, 'UPDATE')
                                    AND has_table_privilege($1, c.oid, 'DELETE'))
                 WHEN 'S' THEN NOT (has_sequence_privilege($1, c.oid, 'USAGE')
                                    AND has_sequence_privilege($1, c.oid, 'SELECT'))
                 ELSE false END""",
            role,
            schema,
        )
        return {row[0] for row in rows}
    finally:
        await conn.close()


@pytest.fixture
def roles() -> Iterator[dict[str, str]]:
    """A schema owned by a new owner role, a new application role and a new control role (passwords by name);
    all dropped afterwards. Skips if the test database's role may not create roles."""
    base = f"bt_doc_{secrets.token_hex(4)}"
    made = {"schema": base, "owner": f"{base}_owner", "app": f"{base}_app", "control": f"{base}_control"}
    made.update({f"{name}_password": secrets.token_hex(8) for name in ("owner", "app", "control")})
    try:
        run_sync(
            lambda: execute(
                postgres_dsn(),
                *(
                    f"CREATE ROLE \"{made[name]}\" LOGIN PASSWORD '{made[name + '_password']}'"
                    for name in ("owner", "app", "control")
                ),
                f'CREATE SCHEMA "{base}" AUTHORIZATION "{made["owner"]}"',
            )
        )
    except asyncpg.InsufficientPrivilegeError:
        pytest.skip(f"{POSTGRES_DSN_ENV}'s role may not create roles")
    try:
        yield made
    finally:
        role_names = [made[name] for name in ("owner", "app", "control")]
        run_sync(
            lambda: execute(
                postgres_dsn(),
                "SET lock_timeout = '10s'",
                f'DROP SCHEMA IF EXISTS "{base}" CASCADE',
                *(f'DROP OWNED BY "{role}"' for role in role_names),
                *(f'DROP ROLE "{role}"' for role in role_names),
            )
        )


def draft(sender: str, recipient: str) -> MailDraft:
    fields = {
        "sender": sender, "recipients": [recipient], "to": [recipient], "subject": "hi", "body": b"body",
        "body_kind": "bytes", "headers": {}, "attachments": [], "size": 6, "at": time.time(),
    }  # fmt: skip
    return msgspec.convert(fields, MailDraft)


async def test_the_documented_grants_give_the_application_role_the_tables_later_migrations_add(
    roles: dict[str, str],
) -> None:
    schema, owner, app, control = roles["schema"], roles["owner"], roles["app"], roles["control"]
    owner_dsn = as_role(owner, roles["owner_password"], schema)
    async with PostgresStore(owner_dsn, migrations=POSTGRES_MIGRATIONS[:OLD]) as store:
        assert store.schema_version == OLD
        assert await store.create_user(User("ada")) and await store.create_user(User("bob"))
    statements = documented_sql()
    assert any(s.startswith("ALTER DEFAULT PRIVILEGES") for s in statements)
    await execute(postgres_dsn(), *(renamed(s, owner, app, schema) for s in statements))  # as the DBA would
    grants = [renamed(s, owner, control, schema) for s in statements if s.startswith("GRANT")]
    await execute(postgres_dsn(), *grants)  # the control role: the grants, no default privileges
    assert await lacking(app, schema) == set() and await lacking(control, schema) == set()

    async with PostgresStore(owner_dsn, migrations=(*POSTGRES_MIGRATIONS, LATER)) as store:  # the upgrade
        assert store.schema_version == LATER.version

    assert await lacking(app, schema) == set()
    assert {"mail_messages", "mail_sends_id_seq", "file_counts", "notes", "notes_id_seq"} <= await lacking(
        control, schema
    )
    app_dsn = as_role(app, roles["app_password"], schema)
    async with PostgresStore(app_dsn, migrations=(*POSTGRES_MIGRATIONS, LATER)) as store:
        sent = await store.mail_send(draft("ada", "bob"), MailLimits(max_messages=10, max_bytes=10_000))
        assert sent is not None
        (item,) = await store.mail_list("bob", None, 10, unread_only=False, newest_first=False, bodies=True)
        assert item.subject == "hi"
    await execute(app_dsn, "INSERT INTO notes (body) VALUES ('later')")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await execute(as_role(control, roles["control_password"], schema), "INSERT INTO notes (body) VALUES ('x')")
