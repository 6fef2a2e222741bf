"""``bastion check``'s reading of the PostgreSQL migrations: which rights on existing tables and functions
they need (``_statement_rights``). Every statement of every migration is either read for rights or on the
explicit list of statements that need none on existing objects, so a new kind of statement cannot slip by."""

from __future__ import annotations

import pytest

from bastion.cli.check import _needs_no_rights, _statement_rights
from bastion.store.postgres_migrations import POSTGRES_MIGRATIONS


@pytest.mark.parametrize(
    ("statement", "tables", "functions"),
    [
        ("ALTER TABLE files ADD COLUMN x int", {("files", "OWNER")}, set()),
        ("alter table only Files add column x int", {("files", "OWNER")}, set()),
        ("ALTER TABLE IF EXISTS ONLY files ADD x int", {("files", "OWNER")}, set()),
        ('ALTER TABLE "Odd Name" ADD x int', {("Odd Name", "OWNER")}, set()),
        ("ALTER TABLE s.files ADD x int", {("files", "OWNER")}, set()),
        ("CREATE INDEX files_by_x ON files (x)", {("files", "OWNER")}, set()),
        ("CREATE INDEX IF NOT EXISTS files_by_x ON files (x)", {("files", "OWNER")}, set()),
        ("CREATE INDEX ON files (x)", {("files", "OWNER")}, set()),
        ("create unique index concurrently if not exists i on only files using btree (x)", {("files", "OWNER")}, set()),
        ("DROP TRIGGER IF EXISTS t ON jobs", {("jobs", "OWNER")}, set()),
        ("DROP TABLE IF EXISTS old_jobs", {("old_jobs", "OWNER")}, set()),
        (
            "CREATE TRIGGER t AFTER INSERT OR UPDATE OF position ON jobs FOR EACH ROW EXECUTE FUNCTION f()",
            {("jobs", "TRIGGER")},
            set(),
        ),
        ("create table a (u text references Users (name))", {("users", "REFERENCES")}, set()),
        ("CREATE OR REPLACE FUNCTION f() RETURNS trigger AS $$ BEGIN END $$ LANGUAGE plpgsql", set(), {"f"}),
        ("ALTER FUNCTION f() OWNER TO x", set(), {"f"}),
        ("DROP FUNCTION IF EXISTS g()", set(), {"g"}),
        ("DROP TABLE IF EXISTS a, s.b CASCADE", {("a", "OWNER"), ("b", "OWNER")}, set()),  # every item of a list
        ("drop function f(int, text), g()", set(), {"f", "g"}),
        ("DROP FUNCTION f(numeric(10, 2), text), g() CASCADE", set(), {"f", "g"}),  # nested: no function "text"
    ],
)
def test_the_rights_a_statement_needs_are_found_whatever_its_spelling(
    statement: str, tables: set[tuple[str, str]], functions: set[str]
) -> None:
    assert _statement_rights(statement) == (tables, functions)


def test_every_migration_statement_is_read_for_rights_or_needs_none() -> None:
    unread = [
        (migration.version, " ".join(statement.split())[:80])
        for migration in POSTGRES_MIGRATIONS
        for statement in migration.statements
        if _statement_rights(statement) == (set(), set()) and not _needs_no_rights(statement)
    ]
    assert unread == [], "statements bastion check cannot tell the rights of: add a pattern or allow them"


def test_statements_that_need_rights_are_not_taken_for_ones_that_need_none() -> None:
    assert not _needs_no_rights("DROP INDEX files_by_x")
    assert not _needs_no_rights("ALTER TABLE files ADD x int")
    assert _needs_no_rights("CREATE TABLE t (x int)") and _needs_no_rights("create function f() returns int")
