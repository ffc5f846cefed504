"""Render `docs/cli.md` from the Typer app itself, so the command reference cannot drift.

Regenerate with `python -m iipad_cli.clidoc > docs/cli.md`; `tests/test_clidoc.py` fails when the
committed file differs from what this module renders. The help text is rendered at a fixed width
(100 columns) with colour and Rich boxes off, so the output does not depend on the terminal.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import typer
import typer.main
from typer.testing import CliRunner

WIDTH = 100
# Rich reads COLUMNS for its width; NO_COLOR and TERM=dumb keep escape codes out (any left are stripped).
HELP_ENV = {"COLUMNS": str(WIDTH), "LINES": "50", "NO_COLOR": "1", "TERM": "dumb"}
HEADER = """# iipad command reference

Generated from the command-line app by `python -m iipad_cli.clidoc > docs/cli.md`; do not edit by
hand (`tests/test_clidoc.py` checks that this file is current). Every command also prints this text
with `--help`.
"""


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _commands(command: Any, path: list[str]) -> list[list[str]]:
    """Depth-first invocation paths of every visible command, the group itself first.

    Typer ships its own copy of click, so groups are recognised by their `commands` mapping
    (registration order, the order `--help` lists them) rather than by class.
    """
    found = [path]
    for name, sub in getattr(command, "commands", {}).items():
        if not getattr(sub, "hidden", False):
            found.extend(_commands(sub, [*path, name]))
    return found


def _help_text(app: typer.Typer, path: list[str]) -> str:
    """What `iipad ... --help` prints, rendered at WIDTH columns without colour."""
    result = CliRunner().invoke(app, [*path[1:], "--help"], env=HELP_ENV, color=False, prog_name=path[0])
    if result.exit_code != 0:
        raise RuntimeError(f"`{' '.join(path)} --help` failed: {result.output}")
    lines = ANSI.sub("", result.output).splitlines()
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def exit_codes() -> str:
    """The exit-code table (iipad_cli.errors.EXIT_CODES)."""
    from iipad_cli.errors import EXIT_CODES

    rows = "\n".join(f"| {code} | {meaning} |" for code, meaning in EXIT_CODES.items())
    return f"## Exit codes\n\nEvery command exits with one of these codes.\n\n| code | meaning |\n|---|---|\n{rows}\n"


def render() -> str:
    """The whole of docs/cli.md as one string."""
    from iipad_cli.cli import app

    sections = [HEADER, exit_codes()]
    for path in _commands(typer.main.get_command(app), ["iipad"]):
        sections.append(f"## `{' '.join(path)}`\n\n```text\n{_help_text(app, path)}\n```\n")
    return "\n".join(sections)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
