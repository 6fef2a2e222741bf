"""The ``bastion`` command: ``serve``, ``call``, ``methods``.

Business logic lives in the package; this layer parses arguments, reads the
configuration at the entry point, and prints results (data to stdout,
messages to stderr, a non-zero exit code on failure).
"""

from __future__ import annotations

from bastion.cli.app import app, main

__all__ = ["app", "main"]
