"""Artifacts are byte-identical for equal contents: safetensors metadata in a fixed order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Each process gets its own hash seed, as separate `iipad bank` runs do; the safetensors writer's
# metadata order follows a per-process random hash, so one process could not show the problem.
WRITE = """
import sys, torch
from iipad_cli.schema.banks import Banks, save_banks
banks = Banks(query=torch.ones(2, 3, 4), prompt=torch.zeros(2, 2, 4), mem=torch.ones(1, 2, 5, 6),
              memory_layers=(2,), paths=["a.png", "b.png"], classes=["x", "y"], metadata={})
save_banks(sys.argv[1], banks, {f"key{i}": str(i) for i in range(12)})
"""


def test_banks_files_are_byte_identical_across_processes(tmp_path: Path) -> None:
    outputs = [tmp_path / f"banks{i}.safetensors" for i in range(4)]
    for out in outputs:
        subprocess.run([sys.executable, "-c", WRITE, str(out)], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert len({out.read_bytes() for out in outputs}) == 1
