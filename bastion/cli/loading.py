"""Loading the operator's own code for ``bastion serve``: ``--service`` and ``--jobs`` modules by name."""

from __future__ import annotations

import importlib
import os
import sys
from typing import TypeVar

from bastion.exceptions import UsageError
from bastion.jobs import JobRegistry, job_specs
from bastion.service import Service

__all__ = ["load_job_registries", "load_services"]

T = TypeVar("T")


def _import_objects(specs: list[str], kind: type[T], kind_name: str, flag: str, example: str) -> list[T]:
    """Import ``module:attribute`` for each spec; the attribute is a ``kind`` (or a list of them)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    found: list[T] = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise UsageError(f"{flag} {spec!r}: expected MODULE:ATTRIBUTE, e.g. {example}")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"{flag} {spec!r}: cannot import {module_name}: {exc}") from None
        value = getattr(module, attr, None)
        items: list[object] = list(value) if isinstance(value, list | tuple) else [value]
        objects = [item for item in items if isinstance(item, kind)]
        if not objects or len(objects) != len(items):
            raise UsageError(f"{flag} {spec!r}: {attr} is not a {kind_name}")
        found.extend(objects)
    return found


def load_services(specs: list[str]) -> list[Service]:
    """Import ``module:attribute`` for each spec; the attribute is a Service (or a list of them)."""
    return _import_objects(specs, Service, "bastion.Service", "--service", "myapp.api:service")


def load_job_registries(specs: list[str]) -> list[JobRegistry]:
    """Import ``module:attribute`` for each spec; the attribute is a JobRegistry. ``UsageError`` if two of
    them offer one job name."""
    registries = _import_objects(specs, JobRegistry, "bastion.jobs.JobRegistry", "--jobs", "myapp.tasks:jobs")
    job_specs(registries)
    return registries
