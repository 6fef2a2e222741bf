"""Lease renewals on real PostgreSQL under each form of the trigger keeping job_owners on UPDATE of jobs.

Variants, interleaved round by round on one table: ``statement`` (migration 14's statement-level trigger
over transition tables, which fires on every UPDATE of jobs), ``row`` (migration 16's row trigger, UPDATE OF
owner, state, args, result, with a WHEN), ``none`` (no UPDATE trigger at all).
Usage (from the repository root; a throwaway schema is made and dropped):

    BASTION_BENCH_POSTGRES_DSN=postgresql://postgres@127.0.0.1:5432/test \
        .venv/bin/python bench/jobs_renew.py [renewals per round] [bytes of arguments]

Environment: ROUNDS (8), SYNC=off (synchronous_commit off: the trigger's cost without the commit's
fsync). Prints the wall-clock time per renewal (median and best round) and the server's CPU time per
renewal (its backend's user + system time, from /proc: so the database must run on this machine), the
number to trust on a shared machine.
"""

import asyncio
import os
import sys
import time
from pathlib import Path

import asyncpg

from bastion.store import PostgresStore
from bastion.store.jobs import JobRecord
from bastion.store.jobs_owners import POSTGRES_OWNERS_SCHEMA
from bastion.store.jobs_postgres import _PG

DSN = os.environ.get("BASTION_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
ARGS = int(sys.argv[2]) if len(sys.argv) > 2 else 100
ROUNDS = int(os.environ.get("ROUNDS", "8"))
OLD_FUNCTION = next(s for s in POSTGRES_OWNERS_SCHEMA if s.startswith("CREATE FUNCTION job_owners_track()"))
OLD_FUNCTION = OLD_FUNCTION.replace("job_owners_track()", "job_owners_track_v14()")
OLD_TRIGGER = (
    "CREATE TRIGGER job_owners_update_v14 AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_jobs NEW TABLE AS "
    "new_jobs FOR EACH STATEMENT EXECUTE FUNCTION job_owners_track_v14()"
)
VARIANTS = {
    "statement": ("ENABLE", "DISABLE"),  # (job_owners_update_v14, job_owners_update)
    "row": ("DISABLE", "ENABLE"),
    "none": ("DISABLE", "DISABLE"),
}


async def main() -> None:
    admin = await asyncpg.connect(DSN)
    schema = f"bench_jobs_{os.getpid()}"
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        async with PostgresStore(f"{DSN}?search_path={schema}") as store:
            for i in range(50):
                await store.jobs_submit(
                    JobRecord(id=f"j{i:03d}", owner=f"u{i % 5}", name="add", args=b"\xc4" + b"x" * ARGS, created_at=1.0)
                )
            for _ in range(10):
                await store.jobs_claim("r1", ["add"], 1.0, 30.0)
        conn = await asyncpg.connect(f"{DSN}?search_path={schema}")
        if os.environ.get("SYNC") == "off":
            await conn.execute("SET synchronous_commit = off")
        await conn.execute(OLD_FUNCTION)
        await conn.execute(OLD_TRIGGER)
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        cpu: dict[str, list[float]] = {}

        def ticks() -> int:  # the server process's user + system CPU time, in clock ticks
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])

        jids = [r[0] for r in await conn.fetch("SELECT id FROM jobs WHERE state = 'running'")]
        results: dict[str, list[float]] = {}
        for _ in range(ROUNDS):
            for name, (old, new) in VARIANTS.items():
                await conn.execute(f"ALTER TABLE jobs {old} TRIGGER job_owners_update_v14")
                await conn.execute(f"ALTER TABLE jobs {new} TRIGGER job_owners_update")
                await conn.execute("VACUUM jobs")
                renew = await conn.prepare(_PG["renew"])
                for i in range(100):  # warm up
                    await renew.fetch(100.0 + i, jids[i % 10], "r1")
                start, used = time.perf_counter(), ticks()
                for i in range(N):
                    await renew.fetch(100.0 + i, jids[i % 10], "r1")
                results.setdefault(name, []).append((time.perf_counter() - start) / N * 1e6)
                cpu.setdefault(name, []).append((ticks() - used) / os.sysconf("SC_CLK_TCK") / N * 1e6)
        base = sorted(results["none"])[len(results["none"]) // 2]
        cpu_base = sum(cpu["none"]) / len(cpu["none"])
        for name, r in results.items():
            r.sort()
            med = r[len(r) // 2]
            print(
                f"{name:>10}: median {med:7.1f} us, best {r[0]:7.1f} us per renewal "
                f"({(med / base - 1) * 100:+.0f}% on none; {len(r)} rounds of {N}, args {ARGS} B, "
                f"synchronous_commit {os.environ.get('SYNC', 'on')})"
            )
            mean = sum(cpu[name]) / len(cpu[name])
            print(f"{'':>10}  server CPU {mean:6.1f} us per renewal ({(mean / cpu_base - 1) * 100:+.0f}% on none)")
        await conn.close()
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


asyncio.run(main())
