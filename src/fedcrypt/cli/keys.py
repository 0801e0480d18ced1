"""``fedcrypt keys``: generate and inspect key files (HE key pairs, secagg consortia)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedcrypt.exceptions import ConfigError
from fedcrypt.protection.he import keys as keyfiles
from fedcrypt.protection.he.params import DEFAULT_PRESET, PRESETS
from fedcrypt.protection.secagg import keys as secagg_keys

app = typer.Typer(help="Generate and inspect key files.", no_args_is_help=True)

_console = Console(highlight=False)


@app.command("generate")
def generate(
    out: Annotated[Path, typer.Option("--out", help="Directory for the key files.")],
    protection: Annotated[
        str,
        typer.Option(
            "--protection",
            help=(
                "he: hospital.key + server.key (one HE key pair); secagg: a consortium's "
                "identity keys, group-mask key and public registry."
            ),
        ),
    ] = "he",
    he_preset: Annotated[
        str,
        typer.Option(
            "--he-preset",
            help=(
                f"HE parameter preset: {', '.join(PRESETS)}, or custom:N:b1,b2,...:scale_bits "
                "(refused unless it meets 128-bit security). --protection he only."
            ),
        ),
    ] = DEFAULT_PRESET,
    hospitals: Annotated[
        int | None,
        typer.Option(
            "--hospitals",
            min=2,
            max=secagg_keys.MAX_HOSPITALS,
            help="Number of hospitals (ids 0..N-1 = their partition ids). --protection secagg.",
        ),
    ] = None,
    group_mask: Annotated[
        bool,
        typer.Option(
            "--group-mask/--no-group-mask",
            help="Generate the consortium group-mask key (the server then cannot read the "
            "aggregate). --protection secagg.",
        ),
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing key files.")] = False,
) -> None:
    """Write the key files a protection mode needs, and say who holds which.

    he: hospital.key (secret key, 0600) for the hospitals, server.key (public) for the server.

    secagg: hospital-<id>.key each (0600), group-mask.key (hospitals, 0600), registry.pub (all).
    """
    mode = protection.strip().lower()
    if mode == "secagg":
        _generate_secagg(out, hospitals=hospitals, group_mask=group_mask, force=force)
        return
    if mode not in ("he", "ckks"):
        raise ConfigError(f"--protection must be he or secagg for key files, got {protection!r}")
    if hospitals is not None:
        raise ConfigError("--hospitals applies to --protection secagg only")
    hospital, server = keyfiles.write_key_files(out, preset=he_preset, overwrite=force)
    info = keyfiles.read_info(server)
    _console.print(f"preset       {info.preset.name}")
    _console.print(f"fingerprint  {info.fingerprint}")
    _console.print(f"hospital key {hospital}  (secret key, mode 0600: copy only to hospitals)")
    _console.print(f"server key   {server}  (public: parameters only, for the aggregator)")


def _generate_secagg(out: Path, *, hospitals: int | None, group_mask: bool, force: bool) -> None:
    if hospitals is None:
        raise ConfigError("--protection secagg needs --hospitals N (the consortium's size)")
    files = secagg_keys.write_consortium(
        out, hospitals=hospitals, group_mask=group_mask, overwrite=force
    )
    table = Table(title=f"secagg consortium of {hospitals} hospitals: who holds what")
    for col in ("file", "holds", "secret", "give to"):
        table.add_column(col, overflow="fold")
    for hid, path in files.identities.items():
        table.add_row(
            str(path),
            f"hospital {hid}'s Ed25519 identity key",
            "yes (0600)",
            f"hospital {hid} only",
        )
    if files.group_mask is not None:
        table.add_row(
            str(files.group_mask),
            "the consortium group-mask key",
            "yes (0600)",
            "every hospital, never the server",
        )
    table.add_row(
        str(files.registry), "every hospital's public key", "no", "the server and every hospital"
    )
    _console.print(table)
    _console.print(f"registry fingerprint {files.fingerprint} (compare it between sites)")
    if files.group_mask is None:
        _console.print("group mask OFF: the server will learn each round's aggregate")


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
