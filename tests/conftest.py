"""Shared test fixtures: the real image fixtures in ../shared/data and the tiny backbone."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """The real-image fixtures: $IIPAD_SHARED_DATA, or `shared/data` beside the repository."""
    if "IIPAD_SHARED_DATA" in os.environ:
        return Path(os.environ["IIPAD_SHARED_DATA"])
    return REPO_ROOT.parent / "shared" / "data"


def _fixtures_missing() -> str:
    """One line saying where the real-image fixtures go (they are not in the repository)."""
    return (
        f"real-image fixtures not found at {shared_data_root()}: put the MVTec AD and VisA fixture folders "
        "(mvtec/, visa/) there or set IIPAD_SHARED_DATA"
    )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The fixture root; tests that need it are skipped in a fresh clone without it, and fail
    where IIPAD_REQUIRE_FIXTURES=1 (CI, where a skip would hide untested code)."""
    root = shared_data_root()
    if not (root / "mvtec").is_dir():
        if os.environ.get("IIPAD_REQUIRE_FIXTURES") == "1":
            pytest.fail(_fixtures_missing())
        pytest.skip(_fixtures_missing())
    # Resolved, because stages record resolved data roots and name files by their real path.
    return root.resolve()


@pytest.fixture(scope="session", autouse=True)
def _session_feature_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Module- and session-scoped fixtures (set up before any test's own) use a session store."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IIPAD_CACHE", str(tmp_path_factory.mktemp("iipad-cache")))
        yield


@pytest.fixture(autouse=True)
def _feature_store_in_tmp(tmp_path: Path) -> Iterator[None]:
    """Every test (and every process it starts) uses its own feature store, never ~/.cache/iipad.

    Its own MonkeyPatch, so a test calling `monkeypatch.undo()` cannot unset it.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IIPAD_CACHE", str(tmp_path / "iipad-cache"))
        yield


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = [report for report in terminalreporter.stats.get("skipped", []) if "real-image fixtures" in str(report.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} tests skipped: {_fixtures_missing()}")


@pytest.fixture(scope="session", autouse=True)
def _cpu_threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_backbone():
    """The `tiny` backbone (seeded random weights, tied Q-Former trunk), shared across tests."""
    from iipad_cli.models.registry import build_random_backbone, get_spec

    return build_random_backbone(get_spec("tiny"))


@pytest.fixture(scope="session")
def scored_run_2shot(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """bottle + tire, 2 shots each (leave-one-out thresholds), one training epoch, banked and scored
    with the `tiny` backbone (random weights); shared by the threshold tests, which only read it.
    Self-contained (`--copy`): a test that edits a copy of it must not write into the feature store."""
    from typer.testing import CliRunner

    from iipad_cli.cli import app

    run_dir = tmp_path_factory.mktemp("scored2") / "run"
    steps = [
        ("extract", str(shared_data / "mvtec"), "--shots", "2", "--backbone", "tiny", "--classes", "bottle,tire",
         "--workers", "0", "-o", str(run_dir), "--copy"),
        ("train", str(run_dir), "--epochs", "1"),
        ("bank", str(run_dir)),
        ("score", str(run_dir)),
    ]
    for step in steps:
        result = CliRunner().invoke(app, [*step, "--quiet", "--device", "cpu"])
        assert result.exit_code == 0, f"{step[0]} failed: {result.stderr}"
    return run_dir
