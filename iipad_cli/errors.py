"""User-facing errors.

Anything the user can fix (bad data, missing weights, stale artifacts) raises `IipadError`; the CLI
prints its message as one line on stderr and exits with code 1, without a traceback.
"""


class IipadError(Exception):
    """An error caused by the user's input or environment, reported as one line, exit code 1."""
