"""The ``fedcrypt`` command: one typer app, one module per command group."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

from fedcrypt import __version__
from fedcrypt.cli import bench, keys, portal, simulate
from fedcrypt.exceptions import FedcryptError

app = typer.Typer(
    name="fedcrypt",
    help=(
        "Privacy-preserving federated learning for hospital consortia: FedAvg on Flower "
        "with CKKS homomorphic encryption or secure aggregation."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("simulate")(simulate.simulate)
app.add_typer(keys.app, name="keys")
app.add_typer(bench.app, name="bench")
app.add_typer(portal.app, name="portal")

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedcrypt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def main() -> None:
    """Entry point: run the CLI, turning a :class:`FedcryptError` into one stderr line.

    Exit status: 0 on success, 2 for a user or peer error (bad option, bad file, failed
    protocol check), 1 for anything unexpected (a bug: its traceback is kept).
    """
    try:
        app(standalone_mode=False)
    except FedcryptError as exc:
        _err.print(f"error: {exc}", markup=False)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _err.print("aborted", markup=False)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(0)


if __name__ == "__main__":
    main()
