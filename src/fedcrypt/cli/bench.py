"""``fedcrypt bench``: benchmarks that print tables and write JSON + PNG."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks: HE cost, protection side-by-side.", no_args_is_help=True)
