"""Signals: SIGTERM / SIGUSR1 (SLURM's warning before the time limit) / Ctrl-C ask for a clean
stop. Installed as the very first thing `dist-train train` does, before the seconds spent
importing torch, so a signal that arrives during start-up is remembered, not lost."""

from __future__ import annotations

import signal

_requested = False


def _handle(signum, frame) -> None:
    global _requested
    _requested = True  # idempotent: SLURM may deliver the signal twice (batch shell + srun)


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, _handle)


def stop_requested() -> bool:
    """This rank saw a signal; the loop agrees on it across ranks before acting."""
    return _requested
