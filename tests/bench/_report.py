"""Shared ending of the stage benchmarks: machine facts and the JSON report (stdout + --json file)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch


def machine_info(device: str) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "note": "random weights",
    }


def emit_report(results: dict[str, Any], json_path: Path | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text + "\n")
