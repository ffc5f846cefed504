"""What `--help` and `--version` show a new user (issue 16, point 4)."""

from __future__ import annotations

import importlib.metadata
import re

from typer.testing import CliRunner

from iipad_cli import clidoc
from iipad_cli.cli import app


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"iipad {importlib.metadata.version('iipad')}\n"


def test_flags_do_not_look_like_they_take_a_value() -> None:
    """`--force <bool>` suggested `--force true`, which fails."""
    text = clidoc.render()
    assert "<bool>" not in text
    assert re.search(r"--force\s+Replace", text)


def test_no_default_is_lost_to_markup() -> None:
    """"[default: ...]" inside a help text is Rich markup: it vanished, leaving "Run directory ."."""
    text = clidoc.render()
    assert not re.search(r"\S \.(\s|│)", text), re.search(r".*\S \.(\s|│).*", text).group(0)
    assert "runs/<data-dir-name>-<K>shot" in text.split("## `iipad extract`", 1)[1]


def test_usage_names_arguments_as_typed() -> None:
    usages = [line.strip() for line in clidoc.render().splitlines() if line.strip().startswith("Usage:")]
    assert not [usage for usage in usages if "{" in usage]
    assert "Usage: iipad extract [OPTIONS] DATA" in usages
    assert "Usage: iipad metrics [OPTIONS] [RUN]..." in usages
    assert "Usage: iipad predict [OPTIONS] RUN IMAGES..." in usages
