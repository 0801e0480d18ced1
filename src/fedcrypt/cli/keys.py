"""``fedcrypt keys``: generate and inspect CKKS key files (owned by the CKKS work)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Generate and inspect CKKS key files.", no_args_is_help=True)
