"""``bastion jobs …`` (being written: issue 5)."""

from __future__ import annotations

import typer

__all__ = ["jobs_app"]

jobs_app = typer.Typer(help="The jobs service.", no_args_is_help=True)
