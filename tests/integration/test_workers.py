"""``bastion serve --workers 2``: real supervisor and worker processes over real TCP+TLS.

Which worker serves a connection is learnt from the ``worker.pid`` method of
a small service written into the server's working directory. Connections
are spread over the workers by the kernel (SO_REUSEPORT), so a test that
needs one connection on each worker opens connections until it has them.

The shared rate-limit table is also checked in process (two limiters over
one table behave as one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import bastion
from bastion import SyncClient
from bastion.security.principal import Principal
from bastion.security.ratelimit import RateLimitConfig, RateRule
from bastion.security.ratelimit_shared import SharedRateLimiter, SharedTable
from tests.support.server import ServerProcess, start_server, wait_for

WORKER_SERVICE = '''
import os

from bastion import Service

service = Service("worker", doc="Which worker process answers.")


@service.method(public=True)
async def pid() -> int:
    """The answering process's id."""
    return os.getpid()
'''

ARGS = ("--workers", "2", "--service", "worker_info:service")
GRACE = "3"


def _prepare(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "worker_info.py").write_text(WORKER_SERVICE)
    return workdir


def _start(
    tmp_path: Path, name: str = "server", env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> ServerProcess:
    workdir = _prepare(tmp_path / name)
    return start_server(workdir, env={"BASTION_LIMITS__GRACE_PERIOD": GRACE, **(env or {})}, args=(*ARGS, *args))


@contextlib.contextmanager
def _running(tmp_path: Path, **kwargs: object) -> Iterator[ServerProcess]:
    server = _start(tmp_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"the supervisor exited with {code}; log:\n{server.log()}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody has reaped yet has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "X")
    return state not in ("Z", "X")


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _one_per_worker(
    server: ServerProcess, count: int = 2, token: str | None = None, limit: int = 60
) -> dict[int, SyncClient]:
    """Open connections until ``count`` distinct workers answer; {pid: client}."""
    found: dict[int, SyncClient] = {}
    spare: list[SyncClient] = []
    try:
        for _ in range(limit):
            client = SyncClient(server.address, token=token, timeout=10, retry=None)
            client.connect()
            pid = client.worker.pid()
            if pid in found:
                spare.append(client)
            else:
                found[pid] = client
            if len(found) == count:
                return found
        raise AssertionError(f"{limit} connections reached only workers {sorted(found)}")
    except BaseException:
        for client in found.values():
            client.close()
        raise
    finally:
        for client in spare:
            client.close()


def _close_all(clients: dict[int, SyncClient]) -> None:
    for client in clients.values():
        with contextlib.suppress(Exception):
            client.close()


# -- processes ------------------------------------------------------------------------------


def test_two_workers_serve_and_sigterm_drains_them(tmp_path: Path) -> None:
    server = _start(tmp_path)
    try:
        assert "worker" in server.banner  # the banner names the services, as with one process
        clients = _one_per_worker(server, token=server.token)
        pids = sorted(clients)
        assert all(_parent(pid) == server.pid for pid in pids), "the workers are the supervisor's children"
        assert server.pid not in pids
        # SIGHUP reaches every worker: each reloads its TLS certificate.
        server.signal(signal.SIGHUP)
        wait_for(lambda: server.log().count("reloaded TLS certificate") == 2, timeout=5, what="both TLS reloads")
        assert clients[pids[0]].worker.pid() == pids[0], "the connections live on"
        # A call in flight on each worker when SIGTERM arrives is finished, then everything exits 0.
        results: dict[int, object] = {}

        def watched(pid: int, client: SyncClient) -> None:
            try:
                results[pid] = client.demo.watched(tag=str(pid), seconds=1.0)
            except Exception as exc:
                results[pid] = exc

        threads = [threading.Thread(target=watched, args=item) for item in clients.items()]
        for thread in threads:
            thread.start()
        for pid in pids:
            server.wait_for_marker(f"started-{pid}")
        server.signal(signal.SIGTERM)
        for thread in threads:
            thread.join(10)
        assert results == {pid: str(pid) for pid in pids}
        _close_all(clients)  # idle connections would keep their worker draining until the grace period
        assert server.process.wait(15) == 0
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=5, what="the workers to exit")
        lines = server.stdout_lines()
        assert not any("listening on" in line for line in lines), "the banner is printed once"
    finally:
        server.stop()


def test_a_killed_worker_loses_only_its_calls_and_is_replaced(tmp_path: Path) -> None:
    with _running(tmp_path) as server:
        clients = _one_per_worker(server, token=server.token)
        victim, survivor = sorted(clients)
        results: dict[int, object] = {}

        def watched(pid: int) -> None:
            try:
                results[pid] = clients[pid].demo.watched(tag=str(pid), seconds=2.0)
            except Exception as exc:
                results[pid] = exc

        threads = [threading.Thread(target=watched, args=(pid,)) for pid in (victim, survivor)]
        for thread in threads:
            thread.start()
        for pid in (victim, survivor):
            server.wait_for_marker(f"started-{pid}")
        os.kill(victim, signal.SIGKILL)
        for thread in threads:
            thread.join(10)
        assert isinstance(results[victim], bastion.ConnectionClosed | bastion.Unavailable), results[victim]
        assert results[survivor] == str(survivor), "the other worker's call is untouched"
        assert clients[survivor].worker.pid() == survivor
        _close_all(clients)

        # The supervisor restarts it: new connections reach two live workers again, one of them new.
        def replaced() -> bool:
            try:
                now = _one_per_worker(server, limit=20)
            except (AssertionError, bastion.BastionError):
                return False
            _close_all(now)
            return survivor in now and victim not in now

        wait_for(replaced, timeout=15, interval=0.2, what="a replacement worker")
        assert server.process.poll() is None
        assert "exited unexpectedly (killed by SIGKILL)" in server.log()
        assert not any("listening on" in line for line in server.stdout_lines()), "no second banner"


def test_the_workers_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    server = _start(tmp_path)
    clients: dict[int, SyncClient] = {}
    try:
        clients = _one_per_worker(server)
        _close_all(clients)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(5)
        wait_for(lambda: not any(_alive(pid) for pid in clients), timeout=10, what="the orphaned workers to exit")
    finally:
        server.stop()
        for pid in clients:  # only if the test failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_hung_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    # A stopped (or deadlocked) worker used to go unnoticed: the kernel kept handing its socket a
    # share of the new connections, and each of them hung until the client gave up.
    with _running(tmp_path, env={"BASTION_WORKER_TIMEOUT": "2"}) as server:
        clients = _one_per_worker(server)
        _close_all(clients)
        hung, other = sorted(clients)
        os.kill(hung, signal.SIGSTOP)
        try:
            wait_for(lambda: not _alive(hung), timeout=10, what="the supervisor to kill the hung worker")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        assert "has not answered for 2 s: killing it" in server.log()

        def replaced() -> bool:
            try:
                now = _one_per_worker(server, limit=20)
            except (AssertionError, bastion.BastionError):
                return False
            _close_all(now)
            return other in now and hung not in now

        wait_for(replaced, timeout=15, interval=0.2, what="a replacement worker")
        assert _alive(other), "the live worker, heartbeating, is left alone"


RATE_CONFIG = """
[rate_limits]
rules = [{ method = "demo.echo", role = "user", rate = 1, burst = 10 }]
"""


def test_a_rate_limit_and_a_lockout_hold_across_workers(tmp_path: Path) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text(RATE_CONFIG)
    env = {"BASTION_AUTH__MAX_FAILURES_PER_USER_SOURCE": "4", "BASTION_AUTH__LOCKOUT": "60"}
    with _running(tmp_path, env=env, args=("--config", str(config))) as server:
        with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
            root.auth.create_user(name="greedy", roles=["user"])
            root.auth.create_user(name="victim", password="the right password 42")
            token = root.auth.create_token(user="greedy")["token"]

        # 30 calls alternating between the two workers: 10 (burst) + ~1/s get through, not 2 x 10.
        clients = _one_per_worker(server, token=token)
        try:
            ok = refused = 0
            started = time.monotonic()
            for i in range(30):
                client = list(clients.values())[i % 2]
                try:
                    client.demo.echo(value=i)
                    ok += 1
                except bastion.ResourceExhausted as exc:
                    assert exc.retry_after is not None and exc.retry_after > 0
                    refused += 1
            elapsed = time.monotonic() - started
            assert ok <= 10 + int(elapsed) + 1, f"{ok} calls passed a 10-burst, 1/s limit in {elapsed:.1f} s"
            assert refused >= 30 - (10 + int(elapsed) + 1)
        finally:
            _close_all(clients)

        # 4 wrong passwords, alternating between the workers, lock the (user, address) pair out.
        clients = _one_per_worker(server)
        try:
            workers = list(clients.values())
            for i in range(4):
                with pytest.raises(bastion.Unauthenticated):
                    workers[i % 2].auth.login(username="victim", password=f"wrong {i}")
            for client in workers:
                with pytest.raises(bastion.ResourceExhausted):
                    client.auth.login(username="victim", password="the right password 42")
        finally:
            _close_all(clients)


def test_a_revoked_token_is_refused_on_every_worker(tmp_path: Path) -> None:
    with _running(tmp_path, env={"BASTION_AUTH__REVALIDATE_INTERVAL": "0.5"}) as server:
        with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
            root.auth.create_user(name="carol", roles=["user"])
            issued = root.auth.create_token(user="carol")
        clients = _one_per_worker(server, token=issued["token"])
        try:
            for client in clients.values():
                assert client.auth.whoami()["name"] == "carol"
            with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
                root.auth.revoke_token(id=issued["id"])  # through whichever worker this connection reached

            def cut_off(client: SyncClient) -> bool:
                try:
                    client.auth.whoami()
                except (bastion.Unauthenticated, bastion.ConnectionClosed, bastion.ConnectError):
                    return True
                return False

            for client in clients.values():
                wait_for(lambda c=client: cut_off(c), timeout=5, interval=0.1, what="the revocation")
        finally:
            _close_all(clients)


# -- the shared table, in process -----------------------------------------------------------


def test_two_limiters_over_one_table_are_one_limiter() -> None:
    table = SharedTable.create(1000)
    try:
        config = RateLimitConfig(rules=[RateRule(method="kv.put", role="user", rate=1.0, burst=5.0)])
        clock = [100.0]
        first = SharedRateLimiter(config, table, clock=lambda: clock[0])
        second = SharedRateLimiter(config, SharedTable(os.dup(table.fileno())), clock=lambda: clock[0])
        ada = Principal("ada", frozenset({"user"}), authenticated=True)
        passed = 0
        for i in range(10):
            try:
                (first if i % 2 else second).check_sync(ada, "10.0.0.1", "kv.put")
                passed += 1
            except bastion.ResourceExhausted as exc:
                assert exc.retry_after == pytest.approx(1.0)
        assert passed == 5
        clock[0] += 2.0  # two tokens back
        first.check_sync(ada, "10.0.0.1", "kv.put")
        second.check_sync(ada, "10.0.0.1", "kv.put")
        with pytest.raises(bastion.ResourceExhausted):
            first.check_sync(ada, "10.0.0.1", "kv.put")
        tokens = {limit["limit"]: limit["tokens"] for limit in second.usage_sync(ada, "10.0.0.1")["limits"]}
        assert tokens["limit on kv.put for role user"] == pytest.approx(0.0)
        bob = Principal("bob", frozenset({"user"}), authenticated=True)
        second.check_sync(bob, "10.0.0.1", "kv.put")  # another identity, another bucket
    finally:
        table.close()


def test_a_full_table_forgets_the_least_recently_used_keys() -> None:
    table = SharedTable.create(32)  # 64 slots
    try:
        limiter = SharedRateLimiter(
            RateLimitConfig(per_principal=None, rules=[RateRule(method="*", rate=1.0, burst=1.0)]),
            table,
            clock=lambda: 0.0,
        )
        for n in range(1000):  # many more identities than slots: never an error, never a stall
            limiter.check_sync(Principal(f"u{n}", frozenset(), authenticated=True), "", "x")
        assert table.slots == 64
    finally:
        table.close()
