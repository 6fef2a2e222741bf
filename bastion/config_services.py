"""The configuration sections of the built-in services: ``kv``, ``messages`` (and its topics), ``files``, ``jobs``.

Split from bastion/config.py, which assembles them into one ``Config`` and
re-exports every name here; import them from there.
"""

from __future__ import annotations

import math
import re

import msgspec

from bastion.exceptions import UsageError
from bastion.security.principal import USER_NAME_RULE
from bastion.services.topics_syntax import pattern_error

__all__ = [
    "DurableTopic",
    "FilesConfig",
    "JobsConfig",
    "KVConfig",
    "MessagesConfig",
    "TopicRule",
    "TopicsConfig",
    "check_finite",
]


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_ROLE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # as auth.set_roles allows; used with fullmatch


def check_finite(struct: msgspec.Struct, section: str) -> None:
    """Refuse NaN (it passes every ``<= 0`` check) and infinity: neither is a number of seconds or bytes."""
    for name in struct.__struct_fields__:
        value = getattr(struct, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{section}.{name} must be a finite number, got {value!r}")


class KVConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``kv`` service.

    max_key_bytes: longest key (UTF-8 bytes).
    max_value_bytes: largest value (must fit a frame: below ``limits.max_frame``).
    max_batch: most keys in one batch get/put.
    max_page: most entries one ``list`` page returns.
    history: changes kept for ``watch`` to resume from (older revisions are compacted).
    history_bytes: the most bytes (keys, values, content types) those changes may hold; the oldest go
        first. Bounds the log's disk use, which no namespace quota counts (at least ``max_value_bytes``).
    sweep_interval: seconds between sweeps that remove expired keys and compact the history.
    watch_buffer: changes buffered for one slow watcher before its stream ends (it resumes from a version).
    watch_buffer_bytes: value bytes buffered for one slow watcher before its stream ends.
    max_watchers: watch streams open at once on this server.
    max_watchers_per_user: watch streams one user may have open on this server (all its workers together);
    ``max_watchers`` bounds each worker process.
    quota_keys: keys one namespace (a user's own, or a shared one) may hold; a put past it is refused.
    quota_bytes: bytes (keys, values and content types) one namespace may hold, likewise.
    """

    max_key_bytes: int = 1024
    max_value_bytes: int = 512 * 1024
    max_batch: int = 256
    max_page: int = 1000
    history: int = 100_000
    history_bytes: int = 256 * 1024 * 1024
    sweep_interval: float = 1.0
    watch_buffer: int = 1024
    watch_buffer_bytes: int = 8 * 1024 * 1024
    max_watchers: int = 1024
    max_watchers_per_user: int = 64
    quota_keys: int = 1_000_000
    quota_bytes: int = 1024**3

    def __post_init__(self) -> None:
        check_finite(self, "kv")
        for name in self.__struct_fields__:
            if getattr(self, name) <= 0:
                raise UsageError(f"kv.{name} must be positive, got {getattr(self, name)!r}")
        if self.history_bytes < self.max_value_bytes:
            raise UsageError(
                f"kv.history_bytes ({self.history_bytes}) must be at least kv.max_value_bytes ({self.max_value_bytes})"
            )


class DurableTopic(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Topics matching ``pattern`` are durable: kept as a log with offsets.

    keep: messages kept per topic (0: no count limit).
    max_age: seconds a message is kept (0: no age limit); at least one of the two is set.
    """

    pattern: str
    keep: int = 100_000
    max_age: float = 0.0


class TopicRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Who may publish and subscribe to topics matching ``pattern``.

    Each list holds "user:NAME", "role:NAME" or "*" (anyone signed in).
    """

    pattern: str
    publish: list[str] = []
    subscribe: list[str] = []


class TopicsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The topics of the ``messages`` service (publish/subscribe); see docs/services.md.

    max_topic_length: longest topic name or pattern (characters).
    max_payload_bytes: largest payload (its MessagePack encoding); must fit a frame.
    max_headers: most headers on one message; max_header_bytes: their total size.
    subscriber_buffer: messages buffered for one slow subscriber before it is told it lagged. Below
        256 (the feed's read) a subscriber that keeps up is ended too when one read holds more than
        this for it (docs/services.md).
    subscriber_buffer_bytes: payload bytes buffered for one slow subscriber, likewise.
    max_subscribers: subscriptions open at once in each server process (each worker of ``--workers``).
    max_subscribers_per_user: subscriptions one user may have open on this server (all its workers together).
    max_durable_topics_per_user: durable topics one user (not an admin) may have created that are still kept.
    relay_seconds: seconds a live message stays in the store for the other processes sharing it.
    sweep_interval: seconds between retention sweeps (on the leader).
    durable: the durable topics (the first matching entry applies); every other topic is live.
    rules: who may publish and subscribe (besides admins, and each user in ``user.<name>.>``).
    """

    max_topic_length: int = 255
    max_payload_bytes: int = 256 * 1024
    max_headers: int = 16
    max_header_bytes: int = 4096
    subscriber_buffer: int = 1024
    subscriber_buffer_bytes: int = 8 * 1024 * 1024
    max_subscribers: int = 4096
    max_subscribers_per_user: int = 64
    max_durable_topics_per_user: int = 1000
    relay_seconds: float = 30.0
    sweep_interval: float = 5.0
    durable: list[DurableTopic] = []
    rules: list[TopicRule] = []

    def __post_init__(self) -> None:
        check_finite(self, "messages.topics")
        for name in self.__struct_fields__:
            if name not in ("durable", "rules") and getattr(self, name) <= 0:
                raise UsageError(f"messages.topics.{name} must be positive, got {getattr(self, name)!r}")
        for i, durable in enumerate(self.durable):
            self._check_pattern(f"messages.topics.durable[{i}].pattern", durable.pattern)
            check_finite(durable, f"messages.topics.durable[{i}]")
            if durable.keep < 0 or durable.max_age < 0 or not (durable.keep or durable.max_age):
                raise UsageError(
                    f"messages.topics.durable[{i}]: keep and max_age must be >= 0, and one of them positive"
                )
        for i, rule in enumerate(self.rules):
            self._check_pattern(f"messages.topics.rules[{i}].pattern", rule.pattern)
            for entry in (*rule.publish, *rule.subscribe):
                if entry != "*" and not _ACCESS_ENTRY.fullmatch(entry):
                    raise UsageError(f'topics.rules[{i}]: {entry!r} is not "user:NAME", "role:NAME" or "*"')

    def _check_pattern(self, where: str, pattern: str) -> None:
        error = pattern_error(pattern, self.max_topic_length)
        if error is not None:
            raise UsageError(f"{where}: {error}")


_ACCESS_ENTRY = re.compile(rf"(user|role):{USER_NAME_RULE}")


class MessagesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``messages`` service: the mailbox limits here, the topics' in ``topics`` (``[messages.topics]``).

    max_recipients: most mailboxes one send delivers to (after expanding ``role:NAME``), and most addresses in ``to``.
    open_roles: the roles every user may send to as ``role:NAME`` (without being shown who holds them);
    admins may send to every role. Empty (the default): only admins may send to a role.
    max_body_bytes: largest body (its bytes, or the JSON of a structured body); must fit a frame.
    max_subject_bytes: longest subject (UTF-8 bytes).
    max_headers: most headers on one message; max_header_bytes: their names and values together.
    max_attachments: most files attached to one message.
    mailbox_messages: messages one mailbox may hold; a send to a full mailbox is refused.
    mailbox_bytes: bytes (bodies, subjects, headers, addresses) one mailbox may hold, likewise.
    mailbox_sender_share: the part of another user's mailbox (of both quotas) one sender's messages may
    fill, so that one sender cannot fill it for everyone; 1: no separate limit. Mail to oneself is exempt.
    send_rate: deliveries (messages times recipients) per minute per sender; 0: no limit.
    send_burst: deliveries a sender may make at once before ``send_rate`` applies.
    client_id_ttl: seconds a send's client_id is remembered (a retry within it is stored once).
    max_page: most messages one ``inbox`` page returns.
    max_watchers: mailbox watches open at once in each server process (each worker of ``--workers``).
    max_watchers_per_user: mailbox watches one user may have open on this server (all its workers together).
    sweep_interval: seconds between sweeps forgetting expired client_ids (on the leader).
    """

    max_recipients: int = 100
    open_roles: list[str] = []
    max_body_bytes: int = 256 * 1024
    max_subject_bytes: int = 1024
    max_headers: int = 32
    max_header_bytes: int = 8192
    max_attachments: int = 16
    mailbox_messages: int = 10_000
    mailbox_bytes: int = 100 * 1024**2
    mailbox_sender_share: float = 0.1
    send_rate: float = 600.0
    send_burst: float = 600.0
    client_id_ttl: float = 7 * 24 * 3600.0
    max_page: int = 500
    max_watchers: int = 1024
    max_watchers_per_user: int = 16
    sweep_interval: float = 300.0
    topics: TopicsConfig = TopicsConfig()

    def __post_init__(self) -> None:
        check_finite(self, "messages")
        for name in self.__struct_fields__:
            if name not in ("topics", "send_rate", "open_roles") and getattr(self, name) <= 0:
                raise UsageError(f"messages.{name} must be positive, got {getattr(self, name)!r}")
        for role in self.open_roles:
            if not isinstance(role, str) or not _ROLE_NAME.fullmatch(role):
                raise UsageError(
                    f"messages.open_roles: {role!r} is not a role name (a lowercase letter, then up to 31 "
                    "lowercase letters, digits, '_' or '-')"
                )
        if self.mailbox_sender_share > 1:
            raise UsageError(
                f"messages.mailbox_sender_share must be in (0, 1] (1: no separate limit), "
                f"got {self.mailbox_sender_share!r}"
            )
        if self.send_rate < 0:
            raise UsageError(f"messages.send_rate must be >= 0 (0: no limit), got {self.send_rate!r}")
        if self.send_rate and self.send_burst < self.max_recipients:
            raise UsageError(
                f"messages.send_burst ({self.send_burst:g}) must be at least messages.max_recipients "
                f"({self.max_recipients}), or a send to that many could never pass"
            )


class FilesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``files`` service.

    directory: where file contents live (default ``<data_dir>/files``); replicas
    sharing a PostgreSQL store must share this directory.
    quota_bytes: bytes each user may own, finished files and open uploads together.
    chunk_bytes: size of the chunks of a download stream (and the upload chunk size
    suggested to clients); must fit a frame: below ``limits.max_frame``.
    upload_ttl: seconds an unfinished upload is kept for resuming.
    blob_grace: seconds contents no file refers to any more are kept before the
    sweep deletes them (so a backup being taken never misses a blob).
    sweep_interval: seconds between sweeps of expired uploads and unreferenced contents.
    max_open_uploads: open uploads one user may have begun at once (whoever is charged).
    max_grantee_reserved_bytes: bytes one user may hold reserved in another user's quota at once
    (uploads begun through that user's write shares).
    max_files: files one user may own, counting the open uploads of new names (whoever began them).
    """

    directory: str = ""
    quota_bytes: int = 10 * 1024**3
    chunk_bytes: int = 256 * 1024
    upload_ttl: float = 24 * 3600
    blob_grace: float = 3600.0
    sweep_interval: float = 60.0
    max_open_uploads: int = 100
    max_grantee_reserved_bytes: int = 1024**3
    max_files: int = 100_000

    def __post_init__(self) -> None:
        check_finite(self, "files")
        if self.max_open_uploads < 1:
            raise UsageError(f"files.max_open_uploads must be >= 1, got {self.max_open_uploads!r}")
        if self.max_files < 1:
            raise UsageError(f"files.max_files must be >= 1, got {self.max_files!r}")
        if self.max_grantee_reserved_bytes < 0:
            raise UsageError(f"files.max_grantee_reserved_bytes must be >= 0, got {self.max_grantee_reserved_bytes!r}")
        if self.quota_bytes < 0 or not 0 < self.chunk_bytes <= 1_000_000:
            raise UsageError("files.quota_bytes must be >= 0 and files.chunk_bytes in 1..1000000")
        if self.upload_ttl <= 0 or self.blob_grace < 0 or self.sweep_interval <= 0:
            raise UsageError("files.upload_ttl and files.sweep_interval must be positive, files.blob_grace >= 0")


#: The largest ``memory_mb`` or ``max_attempts`` of a job: each job's row holds them in PostgreSQL INTEGER columns.
MAX_JOB_INT = 2**31 - 1


class JobsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``jobs`` service.

    modules: ``module:attribute`` of ``JobRegistry`` objects whose jobs may be submitted.
    concurrency: jobs this server runs at once (each in its own process).
    timeout: default wall-clock limit of a job in seconds.
    memory_mb: default address-space limit of a job's process.
    lease: seconds a runner's claim on a job lasts without renewal.
    retention: seconds a finished job and its result are kept.
    max_attempts: runs of a retryable job before it is marked failed.
    max_pending: queued and running jobs one user may have at once.
    max_kept: jobs one user keeps (queued, running and finished, with their arguments and results): a
        submit deletes the submitter's finished jobs older than their newest ``max_kept``, before
        ``retention`` would. Queued and running jobs are never deleted.
    max_bytes: bytes of arguments and results one user's jobs may hold (queued, running and finished):
        a submit, and a job's result, first deletes the user's oldest finished jobs to make room; a
        submit whose arguments do not fit even so is refused (RESOURCE_EXHAUSTED), a result that does
        not fit is not kept (its job fails, saying so). At least ``max_result_bytes``.
    max_result_bytes: largest result a job may return (MessagePack bytes; below ``limits.max_frame``).
    poll_interval: seconds between looks at the shared queue and between store polls of
        ``jobs.watch`` (jobs submitted to this server start at once).
    env_pass: names of the server's environment variables a job's process also receives. By default it
        gets only what a program needs to run (``PATH``, ``HOME``, locale, ``TZ``, ``TMPDIR``, Python's own
        ``PYTHONPATH``...), never the server's settings and secrets (``BASTION_*``, DSNs, tokens).
    env: variables set in every job's process (over those passed on).
    output_bytes: the last bytes of what a job prints (stdout and stderr) that are kept, and logged with
        the job's id when it ends.
    """

    modules: list[str] = []
    concurrency: int = 2
    timeout: float = 3600.0
    memory_mb: int = 1024
    lease: float = 30.0
    retention: float = 7 * 24 * 3600
    max_attempts: int = 3
    max_pending: int = 1000
    max_kept: int = 10_000
    max_bytes: int = 256 * 1024 * 1024
    max_result_bytes: int = 512 * 1024
    poll_interval: float = 1.0
    env_pass: list[str] = []
    env: dict[str, str] = {}
    output_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        check_finite(self, "jobs")
        for name in self.__struct_fields__:
            if name not in ("modules", "env_pass", "env") and getattr(self, name) <= 0:
                raise UsageError(f"jobs.{name} must be positive, got {getattr(self, name)!r}")
        if self.max_bytes < self.max_result_bytes:
            raise UsageError(
                f"jobs.max_bytes ({self.max_bytes}) must be at least jobs.max_result_bytes ({self.max_result_bytes})"
            )
        for name in ("memory_mb", "max_attempts"):  # stored with each job, in INTEGER columns (PostgreSQL)
            if getattr(self, name) > MAX_JOB_INT:
                raise UsageError(f"jobs.{name} must be at most {MAX_JOB_INT}, got {getattr(self, name)}")
        for name in [*self.env_pass, *self.env]:
            if not _ENV_NAME.match(name):
                raise UsageError(f"jobs: {name!r} is not an environment variable name (letters, digits, _)")
        for name, value in self.env.items():
            if "\x00" in value:
                raise UsageError(f"jobs.env: the value of {name} holds a NUL byte")
