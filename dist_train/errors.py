"""User-facing errors: a mistake in a recipe, a flag or a file, reported without a traceback (exit 2)."""

import os


class UserError(Exception):
    """A problem the user can fix; the message names the key/file and the fix."""

    exit_code = 2


def is_main_rank() -> bool:
    """Before the process group exists: only global rank 0 prints (torchrun/accelerate set RANK)."""
    return os.environ.get("RANK", "0") == "0"
