"""``bastion files …`` (being written: issue 5)."""

from __future__ import annotations

import typer

__all__ = ["files_app"]

files_app = typer.Typer(help="The files service.", no_args_is_help=True)
