"""`iipad --help`, `iipad COMMAND --help`, `iipad --version` and `iipad metrics` never import torch or
open_clip (each costs seconds): checked in a fresh interpreter, as a user's shell would start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluate import make_data, make_run

from iipad_cli.commands import COMMAND_MODULES

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "torchvision")
PROBE = """
import json, sys
from iipad_cli.cli import app
try:
    app(sys.argv[1:], prog_name="iipad")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def _run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=REPO)
    return json.loads(result.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], *[[name, "--help"] for name in COMMAND_MODULES], ["weights", "check", "--help"]],
    ids=lambda args: " ".join(args),
)
def test_help_does_not_import_torch(args: list[str]) -> None:
    outcome = _run(*args)
    assert outcome == {"code": 0, "loaded": []}


def test_metrics_does_not_import_torch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_run(tmp_path / "run", data, make_data(data), seed=0)
    outcome = _run("metrics", str(tmp_path / "run"), "--json", "--quiet")
    assert outcome == {"code": 0, "loaded": []}
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_the_probe_sees_torch_when_it_is_imported() -> None:
    """The check itself works: `iipad weights check --backbone tiny` loads the model."""
    assert "torch" in _run("weights", "check", "--backbone", "tiny")["loaded"]
