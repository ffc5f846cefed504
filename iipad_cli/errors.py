"""User-facing errors.

Anything the user can fix (bad data, missing weights, stale artifacts) raises `IipadError`; the CLI
prints its message as one line on stderr and exits with code 1, without a traceback. A command
given wrongly (an option value out of range or not among its choices, conflicting flags, a
missing argument) raises `UsageError`: the same one line, exit code 2 (docs/cli.md, exit codes).
"""


# What each exit code means; docs/cli.md renders this table (iipad_cli/clidoc.py).
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "runtime error: bad or missing input data, missing weights, a stale or damaged artifact, a "
    "run directory in use by another process, a failed write (full disk, read-only, permissions); "
    "one line on stderr naming the file",
    2: "bad usage: an option value out of range or not among its choices (`--shots 0`, `--layout "
    "bogus`), conflicting flags (`metrics --json --csv`), a missing argument, a run given twice",
    130: "interrupted (Ctrl-C); where resuming applies (`extract`, `run`, `demo`) the line says "
    "to rerun the same command, which continues where it stopped",
}


class IipadError(Exception):
    """An error caused by the user's input or environment, reported as one line, exit code 1."""


class UsageError(IipadError):
    """The command line itself is wrong: reported as one line, exit code 2."""
