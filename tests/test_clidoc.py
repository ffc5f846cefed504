"""docs/cli.md is generated from the Typer app; these tests keep the committed file current."""

from __future__ import annotations

from pathlib import Path

import pytest

from iipad_cli import clidoc
from iipad_cli.cli import app

CLI_MD = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_md_is_current() -> None:
    assert CLI_MD.is_file(), "docs/cli.md missing; run: python -m iipad_cli.clidoc > docs/cli.md"
    assert CLI_MD.read_text() == clidoc.render(), "docs/cli.md is stale; run: python -m iipad_cli.clidoc > docs/cli.md"


def test_render_ignores_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendering must not depend on the caller's terminal width or colour settings."""
    reference = clidoc.render()
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert clidoc.render() == reference


def test_every_command_and_option_is_documented() -> None:
    """Each registered command gets a section and each of its long options appears in it."""
    import typer.main

    text = clidoc.render()
    root = typer.main.get_command(app)
    assert "\x1b[" not in text
    for name, command in root.commands.items():
        heading = f"## `iipad {name}`"
        assert heading in text
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in section, f"{opt} of `iipad {name}` missing from docs/cli.md"
        assert max(len(line) for line in section.splitlines()) <= clidoc.WIDTH
