"""Option helpers shared by the command modules (deprecated names, warnings on stderr)."""

from __future__ import annotations

from rich.console import Console

from fedcrypt.config import DEPRECATED_PROTECTIONS

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr (one line)."""
    _err.print(f"warning: {message}", markup=False)


def cli_protection(name: str) -> str:
    """Resolve a ``--protection`` value, warning on stderr for a deprecated alias.

    ``ckks`` is the old name of ``he``: it still runs, with a warning.
    """
    key = name.strip().lower()
    if key in DEPRECATED_PROTECTIONS:
        new = DEPRECATED_PROTECTIONS[key]
        warn(f"--protection {key} is deprecated and will be removed; use --protection {new}")
        return new
    return key
