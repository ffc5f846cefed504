"""`iipad run`'s options, derived from the stage declarations (no option list of its own).

`RunOptions` is a dataclass built from every stage's options: an option that several stages
declare alike (same type and default: `--weights`, `--device`) appears once and reaches them all;
one they declare differently (`--batch-size` is 8 for extract, 1 for train) appears once per stage
with the stage's name in front (`--extract-batch-size`, `--train-batch-size`). `iipad run`'s own
options (the data, the run directory, the seed sweep, force and quiet) come first and win over a
stage's option of the same name. A new field in a stage's options dataclass therefore shows up in
`iipad run` with no edit here.
"""

import copy
import dataclasses
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, get_args, get_type_hints

from iipad_cli import options as o
from iipad_cli.pipeline import STAGES
from iipad_cli.pipeline.stage import Stage


@dataclass(frozen=True)
class RunOwnOptions:
    """What `iipad run` itself decides; these names reach every stage that has them."""

    data: o.DataArg
    shots: o.ShotsGrid
    run_dir: o.Output = None
    seed: o.Seed = 0
    seeds: o.Seeds = None
    force: o.described(o.Force, "Rerun every stage even when its outputs are current.") = False
    quiet: o.Quiet = False


@dataclass(frozen=True)
class _StageField:
    stage: Stage
    name: str
    annotation: Any
    default: Any


def _stage_fields(stage: Stage) -> list[_StageField]:
    hints = get_type_hints(stage.options, include_extras=True)
    return [
        _StageField(stage, f.name, hints[f.name], f.default)
        for f in fields(stage.options)
        if f.name != stage.run_dir_field
    ]


def _prefixed(field: _StageField) -> Any:
    """The option under `--STAGE-NAME`, for an option that stages declare differently."""
    base, info = get_args(field.annotation)
    info = copy.copy(info)
    info.param_decls = ()
    info.help = f"{field.stage.name}: {info.help}"
    return Annotated[base, info]


def _same(a: _StageField, b: _StageField) -> bool:
    return get_args(a.annotation)[0] == get_args(b.annotation)[0] and a.default == b.default


def _build() -> tuple[type, dict[tuple[str, str], str]]:
    """RunOptions and, per (stage, option), the RunOptions field that carries it."""
    own = {f.name for f in fields(RunOwnOptions)}
    hints = get_type_hints(RunOwnOptions, include_extras=True)
    spec: list[tuple[str, Any, Any]] = [
        (f.name, hints[f.name], f.default if f.default is not MISSING else MISSING) for f in fields(RunOwnOptions)
    ]
    by_name: dict[str, list[_StageField]] = {}
    for stage in STAGES:
        for field in _stage_fields(stage):
            by_name.setdefault(field.name, []).append(field)
    carrier: dict[tuple[str, str], str] = {}
    for name, declared in by_name.items():
        if name in own:
            carrier.update({(f.stage.name, name): name for f in declared})
        elif all(_same(declared[0], other) for other in declared[1:]):
            spec.append((name, declared[0].annotation, declared[0].default))
            carrier.update({(f.stage.name, name): name for f in declared})
        else:
            for f in declared:
                spec.append((f"{f.stage.name}_{name}", _prefixed(f), f.default))
                carrier[(f.stage.name, name)] = f"{f.stage.name}_{name}"
    # Required fields first, as dataclasses need; `iipad run --help` lists them in this order.
    ordered = [s for s in spec if s[2] is MISSING] + [s for s in spec if s[2] is not MISSING]
    made = dataclasses.make_dataclass(
        "RunOptions",
        [(name, annotation) if default is MISSING else (name, annotation, dataclasses.field(default=default))
         for name, annotation, default in ordered],
        frozen=True,
    )
    made.__module__ = __name__
    made.__doc__ = "Everything `iipad run` passes on to the stages: its own options and every stage's."
    return made, carrier


RunOptions, _CARRIER = _build()


def run_field(stage: Stage, option: str) -> str:
    """The RunOptions field that carries `option` of `stage` (`batch_size` of train: `train_batch_size`)."""
    return _CARRIER[(stage.name, option)]


def stage_options(stage: Stage, options: Any, run_dir: Path) -> Any:
    """The options `stage` gets from `iipad run`'s options."""
    values = {
        f.name: run_dir if f.name == stage.run_dir_field else getattr(options, run_field(stage, f.name))
        for f in fields(stage.options)
    }
    return stage.options(**values)
