"""The README quotes what `iipad demo` prints: run the demo in a fresh process (so its kernel pinning
takes effect, as for a user) and compare every cell of the README's demo table with the printed one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README_HEADER = "| class | image AUROC |"


def readme_table() -> tuple[list[str], dict[str, list[str]]]:
    """The README's demo table: its column titles and, per class (and `mean`), its cells."""
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(README_HEADER))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return header, rows


def printed_table(stderr: str) -> tuple[list[str], dict[str, list[str]]]:
    """The Rich table the demo prints on stderr (one line per row at a wide terminal): the header
    row is drawn with ┃, the body rows with │."""
    header_line = next(line for line in stderr.splitlines() if line.count("┃") >= 5)
    header = [cell.strip() for cell in header_line.strip().strip("┃").split("┃")]
    body = [line for line in stderr.splitlines() if line.count("│") >= 5]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip().strip("│").split("│")] for line in body)}
    return header, rows


def test_readme_demo_table_parses() -> None:
    header, rows = readme_table()
    assert header[0] == "class" and len(header) == 8
    assert list(rows) == ["granite", "weave", "wood", "mean"]
    assert all(len(cells) == 7 for cells in rows.values())


@pytest.mark.skipif(
    sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"),
    reason="the README quotes the x86-64 CPU numbers",
)
def test_readme_quotes_what_the_demo_prints(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "250"}
    result = subprocess.run(
        [sys.executable, "-m", "iipad_cli.cli", "demo", "-o", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    readme_header, readme_rows = readme_table()
    header, rows = printed_table(result.stderr)
    for column, title in enumerate(readme_header[1:]):
        assert title in header, f"README column {title!r} is not printed by the demo: {header}"
        index = header.index(title) - 1
        for name, cells in readme_rows.items():
            # The mean cell reads "87.5 (3/3)"; the README quotes the number.
            assert rows[name][index].split(" ")[0] == cells[column], f"{name} / {title}"
