"""User-facing errors: a mistake in a recipe, a flag or a file, reported without a traceback (exit 2)."""


class UserError(Exception):
    """A problem the user can fix; the message names the key/file and the fix."""

    exit_code = 2
