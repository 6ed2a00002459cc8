"""`dist-train sweep` (random/grid search) — registered by cli.py."""

from __future__ import annotations


def register(subparsers) -> None:
    """Filled in by the sweep work (issue 6); until then the subcommand does not exist."""
    return None
