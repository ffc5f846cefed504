"""Shared test fixtures: the real image fixtures in ../shared/data and the tiny backbone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """The real-image fixtures: $IIPAD_SHARED_DATA, or `shared/data` beside the repository."""
    if "IIPAD_SHARED_DATA" in os.environ:
        return Path(os.environ["IIPAD_SHARED_DATA"])
    return REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not (root / "mvtec").is_dir():
        pytest.fail(f"real-image fixtures not found at {root}; set IIPAD_SHARED_DATA")
    # Resolved, because stages record resolved data roots and name files by their real path.
    return root.resolve()


@pytest.fixture(autouse=True)
def _feature_store_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test (and every process it starts) uses its own feature store, never ~/.cache/iipad."""
    monkeypatch.setenv("IIPAD_CACHE", str(tmp_path / "iipad-cache"))


@pytest.fixture(scope="session", autouse=True)
def _cpu_threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_backbone():
    """The `tiny` backbone (seeded random weights, tied Q-Former trunk), shared across tests."""
    from iipad_cli.models.registry import build_random_backbone, get_spec

    return build_random_backbone(get_spec("tiny"))
