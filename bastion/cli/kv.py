"""``bastion kv …`` (being written: issue 5)."""

from __future__ import annotations

import typer

__all__ = ["kv_app"]

kv_app = typer.Typer(help="The kv service.", no_args_is_help=True)
