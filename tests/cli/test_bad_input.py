"""Bad input to the ``bastion`` command: a coded one-line error and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from tests.support.server import ServerProcess, bastion_cli


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_a_timeout_that_is_not_seconds_above_0_exits_2(server: ServerProcess, value: str) -> None:
    result = bastion_cli(
        "call", server.address, "admin.health", "--timeout", value, "--token-file", str(server.token_file)
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"Invalid value for --timeout: {float(value)} is not a number of seconds above 0" in result.stderr
