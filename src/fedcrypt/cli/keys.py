"""``fedcrypt keys``: generate and inspect CKKS key files (owned by the CKKS work)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedcrypt.protection.he import keys as keyfiles
from fedcrypt.protection.he.params import DEFAULT_PRESET, PRESETS

app = typer.Typer(help="Generate and inspect CKKS key files.", no_args_is_help=True)

_console = Console(highlight=False)


@app.command("generate")
def generate(
    out: Annotated[Path, typer.Option("--out", help="Directory for hospital.key and server.key.")],
    he_preset: Annotated[
        str,
        typer.Option(
            "--he-preset",
            help=(
                f"CKKS parameter preset: {', '.join(PRESETS)}, or custom:N:b1,b2,...:scale_bits "
                "(refused unless it meets 128-bit security)."
            ),
        ),
    ] = DEFAULT_PRESET,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing key files.")] = False,
) -> None:
    """Write a hospital key file (secret key, mode 0600) and a server key file (public)."""
    hospital, server = keyfiles.write_key_files(out, preset=he_preset, overwrite=force)
    info = keyfiles.read_info(server)
    _console.print(f"preset       {info.preset.name}")
    _console.print(f"fingerprint  {info.fingerprint}")
    _console.print(f"hospital key {hospital}  (secret key, mode 0600: copy only to hospitals)")
    _console.print(f"server key   {server}  (public: parameters only, for the aggregator)")


@app.command("info")
def info(
    file: Annotated[Path, typer.Argument(help="A hospital.key or server.key file.")],
) -> None:
    """Show a key file's preset, fingerprint, kind and whether it holds a secret key."""
    meta = keyfiles.read_info(file)
    p = meta.preset
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("file", str(file))
    table.add_row("kind", meta.kind)
    table.add_row("secret key", "yes" if meta.has_secret_key else "no")
    table.add_row("preset", p.name)
    table.add_row("poly_modulus_degree", str(p.poly_modulus_degree))
    table.add_row("coeff_mod_bit_sizes", ",".join(str(b) for b in p.coeff_mod_bit_sizes))
    table.add_row("encoding", p.encoding)
    if p.is_packed:
        packing = p.packing()
        table.add_row("plain modulus", f"{p.plain_modulus_bits}-bit prime")
        table.add_row("packing", f"{packing.fields} x {packing.field_bits}-bit fields per slot")
        table.add_row("calibration step", f"2^-{p.scale_bits}")
    else:
        table.add_row("scale", f"2^{p.scale_bits}")
    table.add_row("max hospitals", str(p.max_hospitals))
    table.add_row("fingerprint", meta.fingerprint)
    table.add_row("size", f"{meta.size_bytes} bytes")
    _console.print(table)


@app.command("presets")
def presets() -> None:
    """List the HE parameter presets (all pass the 128-bit security check)."""
    table = Table(title="HE presets (--he-preset)")
    for col in ("name", "encoding", "N", "coeff bits", "values/ciphertext", "description"):
        table.add_column(col, overflow="fold")
    for name, p in PRESETS.items():
        per_ct = p.slots * (p.packing().fields if p.is_packed else 1)
        label = f"{name} (default)" if name == DEFAULT_PRESET else name
        table.add_row(
            label,
            p.encoding,
            str(p.poly_modulus_degree),
            ",".join(str(b) for b in p.coeff_mod_bit_sizes),
            f"{per_ct:,}",
            p.description,
        )
    _console.print(table)
