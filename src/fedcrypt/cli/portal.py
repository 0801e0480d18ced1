"""``fedcrypt portal``: the consortium web portal and its hospital-side client."""

from __future__ import annotations

import typer

app = typer.Typer(help="Consortium portal: serve it, or take part as a hospital.", no_args_is_help=True)
