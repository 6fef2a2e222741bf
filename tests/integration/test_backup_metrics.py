"""Scheduled backups as an operator watches them: ``GET /metrics`` of a real ``bastion serve``, and its log.

A scheduled backup that fails is logged and counted in ``admin.stats``; an
alert needs it on ``/metrics`` too (``bastion_backups_total{trigger,result}``),
and nothing secret may reach the log on the way.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import ServerProcess, start_server, wait_for

PASSPHRASE = "do-not-log-me-0x5eed"


def _backups(server: ServerProcess) -> dict[tuple[str, str], float]:
    assert server.gateway_url is not None and server.ca_file is not None
    text = server.scrape()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "bastion_backups":
            for sample in family.samples:
                if sample.name == "bastion_backups_total":
                    out[(sample.labels["trigger"], sample.labels["result"])] = sample.value
    return out


def test_scheduled_backups_are_counted_on_metrics_and_failures_logged_without_secrets(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the backup directory should be")
    env = {
        "BASTION_BACKUP__INTERVAL": "0.2",
        "BASTION_BACKUP__DIRECTORY": str(blocker),
        "BASTION_BACKUP_PASSPHRASE": PASSPHRASE,
    }
    server = start_server(tmp_path / "server", env=env, http=True)
    try:
        counts = wait_for(
            lambda: (c := _backups(server)).get(("scheduled", "failed"), 0) >= 2 and c,
            20,
            interval=0.1,
            what=f"failed scheduled backups on /metrics (log:\n{server.log()})",
        )
        assert counts.get(("scheduled", "ok"), 0) == 0
        assert ("on_demand", "failed") in counts and ("on_demand", "ok") in counts  # always there, for alerts
        log = server.log()
        assert "scheduled backup failed" in log
        assert PASSPHRASE not in log
    finally:
        assert server.stop() == 0, server.log()
