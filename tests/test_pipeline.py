"""Stages declared once: `iipad run` offers every stage option, commands share one declaration per
option, and option checks happen before any stage runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from iipad_cli.cli import app
from iipad_cli.commands import command
from iipad_cli.pipeline import EXTRACT, SCORE, STAGES, TRAIN
from iipad_cli.pipeline.run_options import RunOptions, run_field, stage_options
from iipad_cli.stages import run as run_stage


class Marker:
    """A value no option has by default, to follow one option from RunOptions into a stage."""


def _run_options(**changes: object) -> RunOptions:
    return dataclasses.replace(RunOptions(data=Path("data"), shots=1, run_dir=Path("run")), **changes)


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_every_stage_option_reaches_its_stage_through_run(stage) -> None:
    for field in dataclasses.fields(stage.options):
        if field.name == stage.run_dir_field:
            continue
        marker = Marker()
        options = stage_options(stage, _run_options(**{run_field(stage, field.name): marker}), Path("run"))
        assert getattr(options, field.name) is marker, f"{stage.name}.{field.name}"


def test_run_dir_reaches_extract_as_its_output() -> None:
    assert stage_options(EXTRACT, _run_options(), Path("elsewhere")).output == Path("elsewhere")


def test_options_declared_differently_get_the_stage_name() -> None:
    assert run_field(TRAIN, "batch_size") == "train_batch_size"
    assert run_field(EXTRACT, "batch_size") == "extract_batch_size"
    assert run_field(SCORE, "weights") == "weights"
    assert run_field(TRAIN, "seed") == "seed"


def _capture_pipeline(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []

    def fake_pipeline(options: object) -> object:
        calls.append(options)
        raise SystemExit(0)

    monkeypatch.setattr(run_stage, "run_pipeline", fake_pipeline)
    return calls


def test_run_accepts_the_options_a_new_user_tried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`iipad run DATA --classes bottle` used to fail with "No such option"."""
    calls = _capture_pipeline(monkeypatch)
    prompts = tmp_path / "prompts.yaml"
    args = ["run", "data", "-k", "1", "-o", str(tmp_path / "r"), "--classes", "bottle,tire", "--layout", "mvtec"]
    args += ["--shot-policy", "official", "--prompts", str(prompts), "--workers", "0", "--train-batch-size", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (options,) = calls
    extract = stage_options(EXTRACT, options, tmp_path / "r")
    assert (extract.classes, extract.layout, extract.shot_policy, extract.workers) == (("bottle", "tire"), "mvtec", "official", 0)
    train = stage_options(TRAIN, options, tmp_path / "r")
    assert (train.prompts, train.batch_size) == (prompts, 2)


def test_bad_late_stage_option_fails_before_anything_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(tmp_path / "absent"), "-k", "1", "-o", str(tmp_path / "r"), "--score-batch-size", "0"])
    assert result.exit_code == 2  # bad usage
    assert "--batch-size must be at least 1, got 0" in result.stderr
    assert not (tmp_path / "r").exists()


def test_shared_options_have_one_declaration() -> None:
    """Every command that has --device, --weights or --quiet shows the same help for it."""
    root = typer.main.get_command(app)
    seen: dict[str, set[str]] = {}
    groups = [root, root.commands["weights"]]
    for group in groups:
        for command_ in group.commands.values():
            for param in command_.params:
                if param.name in ("device", "weights", "backbone") and "--" + param.name in param.opts:
                    seen.setdefault(param.name, set()).add(param.help or "")
    assert set(seen) == {"device", "weights", "backbone"}
    assert len(seen["device"]) == 1


@dataclasses.dataclass(frozen=True)
class SeedOptions:
    seed: Annotated[int, typer.Option()] = 0


def test_command_refuses_an_option_declared_twice() -> None:
    def twice(seed: Annotated[int, typer.Option()], options: SeedOptions) -> None:
        """Doc."""

    with pytest.raises(TypeError, match="declared twice"):
        command(twice)
