"""Configuration precedence: defaults < TOML file < environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.config import DEFAULT_PORT, Config, GatewayConfig, JobsConfig, ServerLimits, load_config
from bastion.exceptions import UsageError


def test_defaults() -> None:
    cfg = load_config(environ={})
    assert cfg == Config()
    assert (cfg.host, cfg.port, cfg.limits.max_inflight) == ("127.0.0.1", DEFAULT_PORT, 1024)


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "bastion.toml"
    path.write_text('port = 9000\nhost = "0.0.0.0"\n[limits]\nmax_inflight = 300\nwindow = 8\n')
    env = {"BASTION_PORT": "9100", "BASTION_LIMITS__WINDOW": "32"}
    cfg = load_config(path, environ=env, overrides={"port": 9200, "host": None})
    assert cfg.port == 9200  # flag beats env beats file
    assert cfg.host == "0.0.0.0"  # an unset flag (None) does not override
    assert cfg.limits == ServerLimits(max_inflight=300, window=32)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1\n", "unknown field `bogus`"),
        ("[limits]\nmax_frame = -1\n", "must be positive"),
        ("port = 70000\n", "port must be"),
        ("port = [\n", "not valid TOML"),
        ("[limits]\nhandshake_max_frame = 2000000\n", "must not exceed"),
        ("[limits]\nidle_timeout = 0\n", "idle_timeout must be positive"),
        ("[limits]\nmax_pings_per_10s = -1\n", "max_pings_per_10s must be positive"),
        ("[limits]\nmax_detached_calls = -1\n", "max_detached_calls must be 0 or more"),
        ("[auth]\nmax_failures_per_user_global = 0\n", "max_failures_per_user_global must be at least 1"),
        ("[auth]\nmax_failures_per_source = -3\n", "max_failures_per_source must be at least 1"),
        ("[auth]\nmax_failures_per_user_source = 0\n", "max_failures_per_user_source must be at least 1"),
        ("[gateway]\nbody_timeout = 0\n", "gateway.body_timeout must be positive and finite"),
        ("[gateway]\nbody_min_rate = -1\n", "gateway.body_min_rate must be positive and finite"),
        ("[gateway]\nbody_min_rate = nan\n", "gateway.body_min_rate must be a finite number"),
        ("[gateway]\nbody_timeout = inf\n", "gateway.body_timeout must be a finite number"),
        ("[gateway]\nheader_timeout = nan\n", "gateway.header_timeout must be a finite number"),
        ("[gateway]\nsend_timeout = 0\n", "gateway.send_timeout must be positive and finite"),
        ("[gateway]\nsend_timeout = inf\n", "gateway.send_timeout must be a finite number"),
        ("[gateway]\nmax_answer_bytes = 0\n", "gateway.max_answer_bytes must be positive and at most"),
        ("[gateway]\nmax_answer_memory = 1048576\n", "gateway.max_answer_bytes must be positive and at most"),
        ("[gateway]\nmax_calls_in_flight = 0\n", "gateway.max_calls_in_flight must be positive"),
        ("[gateway]\nmax_batch = 0\n", "gateway.max_batch must be positive"),
    ],
)
def test_bad_config_is_a_clear_usage_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_config(path, environ={})


def test_the_gateways_answer_budgets_come_from_the_file_and_the_environment(tmp_path: Path) -> None:
    assert (GatewayConfig().max_answer_bytes, GatewayConfig().max_answer_memory) == (32 << 20, 256 << 20)
    path = tmp_path / "answers.toml"
    path.write_text("[gateway]\nmax_answer_bytes = 1048576\n")
    cfg = load_config(path, environ={"BASTION_GATEWAY__MAX_ANSWER_MEMORY": "8388608"})
    assert (cfg.gateway.max_answer_bytes, cfg.gateway.max_answer_memory) == (1 << 20, 8 << 20)


def test_the_gateways_cap_on_calls_in_flight_comes_from_the_file_and_the_environment(tmp_path: Path) -> None:
    assert GatewayConfig().max_calls_in_flight == 512
    path = tmp_path / "calls.toml"
    path.write_text("[gateway]\nmax_calls_in_flight = 64\n")
    assert load_config(path, environ={}).gateway.max_calls_in_flight == 64
    cfg = load_config(path, environ={"BASTION_GATEWAY__MAX_CALLS_IN_FLIGHT": "8"})
    assert cfg.gateway.max_calls_in_flight == 8


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml", environ={})


def test_connection_limits_come_from_the_environment() -> None:
    env = {
        "BASTION_LIMITS__IDLE_TIMEOUT": "1",
        "BASTION_LIMITS__MAX_CONNECTIONS_PER_SOURCE": "8",
        "BASTION_LIMITS__WRITE_STALL_TIMEOUT": "2.5",
    }
    limits = load_config(environ=env).limits
    assert (limits.idle_timeout, limits.max_connections_per_source, limits.write_stall_timeout) == (1, 8, 2.5)
    assert limits.write_hard_limit == 4 * limits.write_high_water + limits.max_frame


def test_reserved_connections_default_to_a_tenth_and_stay_below_max_connections(tmp_path: Path) -> None:
    assert ServerLimits().anonymous_connections == 9000
    assert ServerLimits(max_connections=4).anonymous_connections == 4  # a tenth of 4 rounds down to none
    limits = load_config(environ={"BASTION_LIMITS__RESERVED_CONNECTIONS": "0"}).limits
    assert (limits.reserved_connections, limits.anonymous_connections) == (0, 10_000)
    path = tmp_path / "bastion.toml"
    path.write_text("[limits]\nmax_connections = 100\nreserved_connections = 99\n")
    assert load_config(path, environ={}).limits.anonymous_connections == 1
    for reserved in (100, -1):
        with pytest.raises(UsageError, match="reserved_connections must be 0 or more and below"):
            ServerLimits(max_connections=100, reserved_connections=reserved)


def test_a_handshake_accepted_into_the_reserved_connections_gets_a_quarter_of_the_deadline() -> None:
    limits = ServerLimits(max_connections=100, reserved_connections=10)  # handshake_timeout 5 s
    assert [limits.handshake_timeout_at(n) for n in (1, 90, 91, 100)] == [5.0, 5.0, 1.25, 1.25]
    assert ServerLimits(max_connections=100, handshake_timeout=2).handshake_timeout_at(95) == 1.0  # at least 1 s
    assert ServerLimits(max_connections=100, handshake_timeout=0.5).handshake_timeout_at(95) == 0.5  # no longer
    assert ServerLimits(max_connections=100, reserved_connections=0).handshake_timeout_at(100) == 5.0  # no reserve


def test_environment_values_are_read_as_their_keys_types() -> None:
    # The text used to be guessed into a number first: "1.2" became a float, refused for a str key.
    env = {
        "BASTION_TLS__MIN_VERSION": "1.2",
        "BASTION_DATA_DIR": "2024",
        "BASTION_WORKERS": "3",
        "BASTION_GATEWAY__COOKIE_SECURE": "false",
        "BASTION_LIMITS__WRITE_STALL_TIMEOUT": "2.5",
        "BASTION_JOBS__MODULES": "a:jobs,b:jobs",
    }
    cfg = load_config(environ=env)
    assert (cfg.tls.min_version, cfg.data_dir, cfg.workers) == ("1.2", "2024", 3)
    assert (cfg.gateway.cookie_secure, cfg.limits.write_stall_timeout) == (False, 2.5)
    assert cfg.jobs.modules == ["a:jobs", "b:jobs"]


def test_nested_sections_can_be_set_from_the_environment() -> None:
    cfg = load_config(environ={"BASTION_MESSAGES__TOPICS__MAX_SUBSCRIBERS": "7"})
    assert cfg.messages.topics.max_subscribers == 7


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BASTION_LIMITS__MAX_FRAMES": "5"}, "BASTION_LIMITS__MAX_FRAMES: limits has no key 'max_frames'"),
        ({"BASTION_MESSAGES__TOPICS__MAX_SUBSCRIBER": "5"}, "messages.topics has no key 'max_subscriber'"),
        ({"BASTION_RATE_LIMITS__RULES": "x"}, "rate_limits.rules cannot be set from the environment"),
        ({"BASTION_LIMITS": "5"}, "limits is a section; set its keys as BASTION_LIMITS__<KEY>"),
        ({"BASTION_PORT__X": "5"}, "port is a single value, not a section"),
        ({"BASTION_LIMITS__MAX_FRAME": "big"}, r"at `\$.limits.max_frame` \(from BASTION_LIMITS__MAX_FRAME\)"),
    ],
)
def test_a_misnamed_or_mistyped_environment_variable_is_an_error_naming_it(env: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_config(environ=env)


def test_other_bastion_variables_are_left_alone() -> None:
    env = {"BASTION_TOKEN": "t", "BASTION_CA": "ca.pem", "BASTION_BACKUP_PASSPHRASE": "p", "BASTION_TEST__X": "1"}
    assert load_config(environ=env) == Config()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("BASTION_LIMITS__GRACE_PERIOD", "inf"),
        ("BASTION_LIMITS__IDLE_TIMEOUT", "nan"),
        ("BASTION_LIMITS__PING_INTERVAL", "inf"),
        ("BASTION_AUTH__SESSION_TTL", "nan"),
        ("BASTION_KV__SWEEP_INTERVAL", "nan"),
        ("BASTION_FILES__SWEEP_INTERVAL", "inf"),
        ("BASTION_FILES__BLOB_GRACE", "nan"),
        ("BASTION_JOBS__LEASE", "nan"),
        ("BASTION_MESSAGES__SWEEP_INTERVAL", "nan"),
        ("BASTION_BACKUP__INTERVAL", "nan"),
        ("BASTION_GATEWAY__IDLE_SECONDS", "inf"),
    ],
)
def test_nan_and_infinity_are_refused_naming_the_key(key: str, value: str) -> None:
    # NaN passes every "<= 0" check; neither is a number of seconds. Both were accepted.
    name = key[len("BASTION_") :].lower().replace("__", ".")
    with pytest.raises(UsageError, match=rf"{name} must be a finite number, got {value}"):
        load_config(environ={key: value})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nping_interval = inf\n", "limits.ping_interval must be a finite number"),
        ("[limits]\nping_interval = 1e300\n", "limits.ping_interval is too large"),
        ("[limits]\nwindow = 18446744073709551615\n", "limits.window must be below 2"),
        ("[backup]\ninterval = -1\n", "backup.interval must be >= 0 and backup.keep at least 1, got -1.0, 7"),
        ("[backup]\nkeep = 0\n", "backup.interval must be >= 0 and backup.keep at least 1, got 0.0, 0"),
        (
            '[[messages.topics.durable]]\npattern = "a.>"\nmax_age = nan\n',
            r"messages.topics.durable\[0\].max_age must be a finite number",
        ),
    ],
)
def test_values_no_server_could_run_with_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_config(path, environ={})


def test_a_config_file_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'data_dir = "caf\xe9"\n')  # was an uncaught UnicodeDecodeError: a traceback
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    "text",
    [
        "[limits]\nmax_frame = 65536\n",  # with the default chunk_bytes (256 KiB)
        "[limits]\nmax_frame = 300000\n[files]\nchunk_bytes = 299500\n",
    ],
)
def test_an_upload_chunk_size_over_the_frame_limit_is_refused(tmp_path: Path, text: str) -> None:
    # Clients are told to upload in chunk_bytes chunks: each one was over the frame limit, so every upload failed.
    path = tmp_path / "frame.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=r"files.chunk_bytes \(\d+\) must be below limits.max_frame"):
        load_config(path, environ={})


def test_a_smaller_frame_works_with_a_chunk_size_that_fits_it(tmp_path: Path) -> None:
    path = tmp_path / "small.toml"
    path.write_text(f"[limits]\nmax_frame = 65536\n[files]\nchunk_bytes = 32768\n{_SMALL_SIZES}")
    assert load_config(path, environ={}).files.chunk_bytes == 32768


# Everything else a message carries whole, made to fit a 64 KiB frame.
_SMALL_SIZES = (
    "[kv]\nmax_value_bytes = 32768\nhistory_bytes = 32768\n[jobs]\nmax_result_bytes = 32768\n"
    "[messages]\nmax_body_bytes = 32768\n[messages.topics]\nmax_payload_bytes = 32768\n"
)


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        ("BASTION_JOBS__MAX_RESULT_BYTES=2000000", r"jobs.max_result_bytes \(2000000\) must be below limits.max_frame"),
        ("BASTION_JOBS__MAX_RESULT_BYTES=1048000", r"jobs.max_result_bytes \(1048000\) must be below limits.max_frame"),
        ("BASTION_KV__MAX_VALUE_BYTES=1048000", r"kv.max_value_bytes \(1048000\) must be below limits.max_frame"),
        ("BASTION_KV__MAX_KEY_BYTES=600000", r"kv.max_value_bytes \(524288\) .*\(kv.max_key_bytes \(600000\)"),
        ("BASTION_MESSAGES__MAX_BODY_BYTES=1048000", r"messages.max_body_bytes \(1048000\) must be below"),
        ("BASTION_MESSAGES__TOPICS__MAX_PAYLOAD_BYTES=1048000", r"messages.topics.max_payload_bytes \(1048000\)"),
        ("BASTION_LIMITS__MAX_FRAME=400000", r"jobs.max_result_bytes \(524288\) must be below limits.max_frame"),
    ],
)
def test_a_value_or_result_size_no_frame_could_carry_is_refused(setting: str, refusal: str) -> None:
    # A job's result of max_result_bytes (or a kv value, a message body...) was accepted but could never
    # be sent in one frame: fetching it failed every time, and nothing said why at start-up.
    name, _, value = setting.partition("=")
    environ = {"BASTION_KV__HISTORY_BYTES": "10000000", "BASTION_JOBS__MAX_BYTES": "10000000", name: value}
    with pytest.raises(UsageError, match=refusal) as info:
        load_config(environ=environ)
    assert "limits.max_frame (" in str(info.value)


def test_sizes_that_fit_the_frame_are_accepted() -> None:
    config = load_config(environ={"BASTION_LIMITS__MAX_FRAME": "4194304", "BASTION_JOBS__MAX_RESULT_BYTES": "4000000"})
    assert config.jobs.max_result_bytes == 4_000_000
    assert load_config(environ={}).jobs.max_result_bytes == 512 * 1024  # the defaults fit the default frame


def test_a_change_log_byte_bound_below_one_value_is_refused() -> None:
    with pytest.raises(UsageError, match=r"kv.history_bytes \(1000\) must be at least kv.max_value_bytes \(524288\)"):
        load_config(environ={"BASTION_KV__HISTORY_BYTES": "1000"})
    assert load_config(environ={"BASTION_KV__HISTORY_BYTES": "524288"}).kv.history_bytes == 524288


def test_an_argument_memory_too_small_for_one_frame_is_refused() -> None:
    with pytest.raises(UsageError, match=r"limits.max_args_memory \(1000000\) must hold one call of limits.max_frame"):
        load_config(environ={"BASTION_LIMITS__MAX_ARGS_MEMORY": "1000000"})
    assert ServerLimits(max_frame=16_384, max_args_memory=2_000_000).max_args_memory == 2_000_000


def test_a_stream_buffer_too_small_for_one_window_is_refused() -> None:
    assert ServerLimits().max_stream_buffer == 64 * 1024**2
    with pytest.raises(UsageError, match=r"limits.max_stream_buffer \(1000000\) must hold one call's window"):
        load_config(environ={"BASTION_LIMITS__MAX_STREAM_BUFFER": "1000000"})
    with pytest.raises(UsageError, match=r"limits.max_stream_buffer must be positive"):
        ServerLimits(max_stream_buffer=0)
    assert ServerLimits(window=4, max_frame=16_384, max_stream_buffer=65_536).max_stream_buffer == 65_536


def test_a_stream_buffer_total_below_one_connections_limit_is_refused() -> None:
    assert ServerLimits().max_stream_buffer_total == 1024**3
    with pytest.raises(UsageError, match=r"limits.max_stream_buffer_total \(1000000\) must be at least"):
        load_config(environ={"BASTION_LIMITS__MAX_STREAM_BUFFER_TOTAL": "1000000"})
    limits = ServerLimits(max_stream_buffer=64 * 1024**2, max_stream_buffer_total=64 * 1024**2)
    assert limits.max_stream_buffer_total == 64 * 1024**2


def test_job_environment_settings_are_checked() -> None:
    cfg = load_config(environ={"BASTION_JOBS__ENV_PASS": "SSL_CERT_FILE,HTTPS_PROXY"})
    assert cfg.jobs.env_pass == ["SSL_CERT_FILE", "HTTPS_PROXY"]
    with pytest.raises(UsageError, match="'A=B' is not an environment variable name"):
        load_config(environ={"BASTION_JOBS__ENV_PASS": "A=B"})
    with pytest.raises(UsageError, match=r"BASTION_JOBS__ENV: jobs\.env cannot be set from the environment"):
        load_config(environ={"BASTION_JOBS__ENV": "X=1"})
    with pytest.raises(UsageError, match="the value of X holds a NUL byte"):
        JobsConfig(env={"X": "a\x00b"})


def test_job_limits_a_job_row_cannot_hold_are_refused() -> None:
    # memory_mb and max_attempts are stored with every job, in PostgreSQL INTEGER columns: past 2**31 - 1
    # every submission failed there ("store: value rejected ... out of int32 range"), while SQLite took
    # them and each job's process then died setting its memory limit (setrlimit overflowing a C long).
    JobsConfig(memory_mb=2**31 - 1, max_attempts=2**31 - 1)
    for field in ("memory_mb", "max_attempts"):
        with pytest.raises(UsageError, match=rf"jobs\.{field} must be at most 2147483647"):
            JobsConfig(**{field: 2**31})
