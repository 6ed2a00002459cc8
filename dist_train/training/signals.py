"""Signals: SIGTERM / SIGUSR1 (SLURM's warning before the time limit) / Ctrl-C ask for a clean
stop. Installed as the very first thing `dist-train train` does, before the seconds spent
importing torch, so a signal that arrives during start-up is remembered, not lost.

A run installs the handlers (a no-op when the CLI already did, keeping a start-up signal) and
restores the previous ones at teardown, clearing the request: one Ctrl-C in a notebook stops
that run only, and Ctrl-C means KeyboardInterrupt again once no run is going."""

from __future__ import annotations

import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_requested = False
_previous: dict[int, object] | None = None  # the handlers install() replaced; None: not ours


def _handle(signum, frame) -> None:
    global _requested
    _requested = True  # idempotent: SLURM may deliver the signal twice (batch shell + srun)


def install() -> None:
    """Our handlers, with the previous ones recorded. Already installed (the CLI did it first
    thing): nothing changes, so a signal that arrived during start-up still stops this run.
    Freshly installed: any request left from before is cleared."""
    global _previous, _requested
    if _previous is not None:
        return
    _requested = False
    _previous = {sig: signal.signal(sig, _handle) for sig in STOP_SIGNALS}


def restore() -> None:
    """The handlers from before install() back, and the request cleared (end of a run)."""
    global _previous, _requested
    if _previous is not None:
        for sig, handler in _previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _previous, _requested = None, False


def stop_requested() -> bool:
    """This rank saw a signal; the loop agrees on it across ranks before acting."""
    return _requested


# What this rank is doing, named at every collective site, so a failure can say where it hung.
_phase = "start-up"


def set_phase(text: str) -> None:
    global _phase
    _phase = text


def phase() -> str:
    return _phase


class Heartbeat:
    """Each rank records `step time` in the rendezvous store at the stop-check interval, so a
    survivor of a dead or stalled peer can say which rank stopped answering and when.

    The launcher's store is reached through the private `distributed_c10d._get_default_store()`
    (torch has no public accessor for the default group's store). Kept: it is what lets the
    survivor's report name the dead rank (tests/reliability/test_hangs.py), it is read only at
    the stop-check interval, and tests/unit/test_trainer.py fails loudly if it disappears;
    should it vanish at runtime, the report says "no heartbeat store" instead of failing."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.store = rank, world, None
        if world > 1:
            try:  # the launcher's rendezvous store: still up when a rank dies
                from torch.distributed import distributed_c10d

                self.store = distributed_c10d._get_default_store()
            except (ImportError, RuntimeError, AttributeError):
                self.store = None

    def beat(self, step: int) -> None:
        if self.store is not None:
            self.store.set(f"dist_train/heartbeat/{self.rank}", f"{step} {time.time():.3f}")

    def peers(self) -> str:
        """`rank 1 last seen at step 40, 31 s ago; ...` (best effort: never raises)."""
        if self.store is None:
            return "no heartbeat store"
        seen = []
        for r in range(self.world):
            if r == self.rank:
                continue
            key = f"dist_train/heartbeat/{r}"
            try:
                if not self.store.check([key]):
                    seen.append(f"rank {r} never reported a step")
                    continue
                step, stamp = self.store.get(key).decode().split()
                seen.append(
                    f"rank {r} last seen at step {step}, {time.time() - float(stamp):.0f} s ago"
                )
            except Exception:  # the store itself may be gone with the dead rank
                seen.append(f"rank {r}: unknown (store unreachable)")
        return "; ".join(seen)


def is_collective_failure(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text
        for s in (
            "gloo",
            "Gloo",
            "NCCL",
            "Connection closed",
            "Connection reset",
            "timed out",
            "Timed out",
            "Broken pipe",
        )
    )


def ask_for_requeue(accelerator) -> None:
    """Launchers turn a rank's exit 75 into 1, so the SLURM job script also looks for this file
    (its path is in DIST_TRAIN_REQUEUE_FILE) to know the stop was a clean, saved preemption."""
    import os
    from pathlib import Path

    marker = os.environ.get("DIST_TRAIN_REQUEUE_FILE")
    if marker and accelerator.is_main_process:  # one rank writes the shared marker
        Path(marker).write_text("saved\n")
    accelerator.wait_for_everyone()  # collective: no rank exits before the marker exists
