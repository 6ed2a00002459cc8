"""User-facing errors: a mistake in a recipe, a flag or a file, reported without a traceback.

UserError exits 2; RunFailure subclasses carry their own exit codes (3, 4).
"""

import os


class UserError(Exception):
    """A problem the user can fix; the message names the key/file and the fix."""

    exit_code = 2


def is_main_rank() -> bool:
    """Before the process group exists: only global rank 0 prints (torchrun/accelerate set RANK)."""
    return os.environ.get("RANK", "0") == "0"


class RunFailure(Exception):
    """Training could not go on (not a recipe typo); printed by every rank that hits it."""

    exit_code = 1
    all_ranks = True


class NonFiniteStop(RunFailure):
    """A non-finite loss/gradient with `train.on_nonfinite: stop` (or too many skips)."""

    exit_code = 3
    all_ranks = False  # the decision is identical on every rank; rank 0 says it once


class CollectiveFailure(RunFailure):
    """Another rank died or stalled past `train.collective_timeout_s`."""

    exit_code = 4
