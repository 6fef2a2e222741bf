"""Registering job functions for the ``jobs`` service.

A job is a plain, synchronous, type-hinted function defined at the top level
of an importable module::

    from bastion.jobs import JobRegistry, Progress

    registry = JobRegistry()

    @registry.job(timeout=600, memory_mb=512)
    def resize(path: str, width: int, progress: Progress) -> dict[str, int]:
        ...
        progress(0.5, "halfway")
        return {"width": width}

and ``bastion serve --jobs myapp.tasks:registry`` offers it for submission.

Theory of operation
-------------------

The hints are the contract, as for service methods: the arguments of a
submission are validated from them by msgspec (unknown or missing fields and
wrong types are INVALID_ARGUMENT) and stored as MessagePack. The return hint
is checked the same way when the job ends (``JobSpec.convert_result``): a
result that does not match it fails the job, and one that does is stored as
that type encodes (a Struct from a map, a float from an int). A parameter named
``progress`` (or typed ``Progress``) is not an argument: the runner passes a
callable that reports ``(fraction, message)`` back to the server.

A job never runs in the server process. The runner starts a fresh Python
process (``bastion.services.jobs_runner``) that imports the function by its
module and qualified name, finds the ``JobSpec`` this decorator attached to
it, decodes the stored arguments with that spec's argument type and calls it.
The name a client submits only selects among registered jobs: nothing from
the network chooses a module, a type or a function.
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, TypeVar, overload

import msgspec

from bastion.config_services import MAX_JOB_INT
from bastion.exceptions import InvalidArgument, UsageError
from bastion.service import brief_error

__all__ = [
    "JOB_ATTRIBUTE", "RESULT_MISMATCH", "JobRegistry", "JobSpec", "Progress", "ResultMismatch", "build_job_spec",
    "job_specs",
]  # fmt: skip

F = TypeVar("F", bound=Callable[..., Any])
_NAME = re.compile(r"^[a-z_][a-z0-9_]*\Z")

#: The attribute a registered function carries its ``JobSpec`` in (the runner reads it).
JOB_ATTRIBUTE = "__bastion_job__"


class Progress(Protocol):
    """What a job calls to report how far it is: ``progress(0.25, "reading input")``.

    ``fraction`` is clamped to [0, 1]; ``message`` is cut to 200 characters.
    Calls are throttled, so a job may call it as often as it likes.
    """

    def __call__(self, fraction: float, message: str = "") -> None: ...


#: How the failure of a job whose result does not match its return type starts (then the type and why).
RESULT_MISMATCH = "the job's result does not match its return type"


class ResultMismatch(ValueError):
    """A job's result does not match its declared return type (the message says where and how)."""


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else repr(hint).replace("typing.", "")


class JobSpec(msgspec.Struct, frozen=True):
    """One registered job function, read from its signature once."""

    name: str
    func: Callable[..., Any]
    module: str
    qualname: str
    args_type: type[msgspec.Struct]
    progress_param: str | None
    retryable: bool = False
    timeout: float | None = None
    memory_mb: int | None = None
    doc: str = ""
    result_type: Any = Any  # the return hint (Any without one)

    def validate(self, args: Mapping[str, Any]) -> bytes:
        """Check ``args`` against the hints; the MessagePack the runner will decode.

        Raises ``InvalidArgument`` naming the bad field.
        """
        try:
            value = msgspec.convert(dict(args), self.args_type)
        except msgspec.ValidationError as exc:
            raise InvalidArgument(f"job {self.name!r}: {brief_error(str(exc))}") from None
        return msgspec.msgpack.encode(value)

    def decode_args(self, data: bytes) -> dict[str, Any]:
        """The keyword arguments stored by ``validate`` (used in the job's process)."""
        value = msgspec.msgpack.decode(data, type=self.args_type)
        return {name: getattr(value, name) for name in self.args_type.__struct_fields__}

    def convert_result(self, data: bytes) -> bytes:
        """The job's result (MessagePack) converted to its return type, as MessagePack.

        Raises ``ResultMismatch`` (saying where and how) if it does not match, as a client decoding it
        by that type would find."""
        if self.result_type in (Any, object):
            return data
        try:
            value = msgspec.msgpack.decode(data, type=self.result_type)
        except msgspec.ValidationError as exc:
            where = str(exc).replace("`$", "`result")
            raise ResultMismatch(f"{RESULT_MISMATCH} {_type_name(self.result_type)}: {where}"[:2000]) from None
        return msgspec.msgpack.encode(value)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: name, doc, limits and the JSON Schema of the arguments."""
        try:
            schema = msgspec.json.schema(self.args_type)
        except TypeError:
            schema = {}
        defs = schema.pop("$defs", {})
        params = defs.pop(self.args_type.__name__, schema)
        out: dict[str, Any] = {
            "name": self.name,
            "doc": self.doc,
            "retryable": self.retryable,
            "timeout": self.timeout,
            "memory_mb": self.memory_mb,
            "params": params,
        }
        if defs:
            out["$defs"] = defs
        return out


def build_job_spec(
    func: Callable[..., Any],
    *,
    name: str | None = None,
    retryable: bool = False,
    timeout: float | None = None,
    memory_mb: int | None = None,
) -> JobSpec:
    """Read a job function's signature and hints into a ``JobSpec``."""
    label: str = name or str(getattr(func, "__name__", repr(func)))
    if not _NAME.match(label):
        raise UsageError(f"job name {label!r} must match {_NAME.pattern}")
    if not inspect.isfunction(func) or inspect.iscoroutinefunction(func) or inspect.isgeneratorfunction(func):
        raise UsageError(f"job {label!r}: a job is a plain (not async, not generator) function")
    if "<locals>" in func.__qualname__ or func.__module__ in (None, "__main__"):
        raise UsageError(f"job {label!r}: define it at the top level of an importable module")
    # "not > 0", not "<= 0": NaN passes the latter (and infinity is no limit).
    if (timeout is not None and not 0 < timeout < math.inf) or (memory_mb is not None and not memory_mb > 0):
        raise UsageError(f"job {label!r}: timeout and memory_mb must be positive (and finite)")
    if memory_mb is not None and memory_mb > MAX_JOB_INT:  # stored with each job, in an INTEGER column
        raise UsageError(f"job {label!r}: memory_mb must be at most {MAX_JOB_INT}")
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception as exc:
        raise UsageError(f"job {label!r}: cannot resolve type hints: {exc}") from exc
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    progress_param = None
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise UsageError(f"job {label!r}: parameter {param.name!r} must be an ordinary named parameter")
        hint = hints.get(param.name)
        if param.name == "progress" or hint is Progress:
            progress_param = param.name
            continue
        if hint is None:
            raise UsageError(f"job {label!r}: parameter {param.name!r} needs a type hint")
        fields.append((param.name, hint) if param.default is param.empty else (param.name, hint, param.default))
    try:
        args_type = msgspec.defstruct(
            f"job.{label}", fields, kw_only=True, forbid_unknown_fields=True, module=func.__module__
        )
        msgspec.msgpack.Decoder(args_type)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"job {label!r}: argument types are not supported: {exc}") from exc
    result_type = hints.get("return", Any)
    try:
        msgspec.msgpack.Decoder(result_type)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"job {label!r}: its return type is not supported: {exc}") from exc
    return JobSpec(
        name=label,
        func=func,
        module=func.__module__,
        qualname=func.__qualname__,
        args_type=args_type,
        progress_param=progress_param,
        retryable=retryable,
        timeout=timeout,
        memory_mb=memory_mb,
        doc=inspect.getdoc(func) or "",
        result_type=result_type,
    )


class JobRegistry:
    """The job functions a server may run, by name."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobSpec] = {}

    def __repr__(self) -> str:
        return f"JobRegistry({sorted(self.jobs)})"

    def __contains__(self, name: object) -> bool:
        return name in self.jobs

    def __iter__(self) -> Iterator[JobSpec]:
        return iter(self.jobs.values())

    def __len__(self) -> int:
        return len(self.jobs)

    def get(self, name: str) -> JobSpec | None:
        return self.jobs.get(name)

    @overload
    def job(self, fn: F, /) -> F: ...

    @overload
    def job(
        self,
        *,
        name: str | None = None,
        retryable: bool = False,
        timeout: float | None = None,
        memory_mb: int | None = None,
    ) -> Callable[[F], F]: ...

    def job(  # type: ignore[misc]  # mypy misreads the bare-decorator overload
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        retryable: bool = False,
        timeout: float | None = None,
        memory_mb: int | None = None,
    ) -> F | Callable[[F], F]:
        """Register ``fn`` as a job; usable bare or with options. The function is returned unchanged.

        name: what clients submit (default: the function's name).
        retryable: running it again after its runner was lost (a server crash)
            is safe; it is re-queued instead of being marked failed.
        timeout: wall-clock seconds before its process is killed (default: ``jobs.timeout``).
        memory_mb: address-space limit of its process (default: ``jobs.memory_mb``).
        """

        def register(func: F) -> F:
            spec = build_job_spec(func, name=name, retryable=retryable, timeout=timeout, memory_mb=memory_mb)
            if spec.name in self.jobs:
                raise UsageError(f"job {spec.name!r} is registered twice")
            self.jobs[spec.name] = spec
            setattr(func, JOB_ATTRIBUTE, spec)
            return func

        return register(fn) if fn is not None else register


def job_specs(registries: Iterable[JobRegistry]) -> dict[str, JobSpec]:
    """Every job of ``registries`` by name; ``UsageError`` if two registries offer different functions under
    one name (the same registry given twice is fine)."""
    specs: dict[str, JobSpec] = {}
    for registry in registries:
        for spec in registry:
            known = specs.setdefault(spec.name, spec)
            if (known.module, known.qualname) != (spec.module, spec.qualname):
                raise UsageError(
                    f"job {spec.name!r} is registered twice: {known.module}.{known.qualname} and "
                    f"{spec.module}.{spec.qualname} (rename one: @registry.job(name=...))"
                )
    return specs
