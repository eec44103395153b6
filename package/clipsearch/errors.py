"""The error a user can fix: library code raises it, every command prints it as one line."""
from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix (a missing file, a wrong model, a bad flag combination).

    `clipsearch.cli.common.run_command` prints it as one line and exits non-zero; anything else
    is a bug and keeps its traceback.
    """
