"""``fedcrypt simulate``: run a whole federation on Flower's simulation engine."""

from __future__ import annotations


def simulate() -> None:
    """Run a federation on this machine (placeholder)."""
