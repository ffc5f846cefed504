"""What a stage is: one declared object that `iipad STAGE` and `iipad run` are both built from.

A stage's options dataclass is the single declaration of its command-line options: each field is
annotated with a Typer alias from `iipad_cli/options.py`, so `iipad STAGE --help` and `iipad run
--help` are generated from it (`iipad_cli/commands/__init__.py`, `iipad_cli/pipeline/run_options.py`).
The same object validates its values (`validate`, one place per check), says which of them decide
the stage's result (`key`: what `iipad run` compares with the options the stage recorded in
RUN/manifest.json) and which unhashed outputs must exist (`missing`). The `Stage` record adds the
stage's name, its output files and how to run it; running imports the heavy modules (torch) only
when called, so building the command line stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from iipad_cli.errors import UsageError


class StageOptions(Protocol):
    """What every stage's options dataclass provides (see the module docstring)."""

    force: bool
    quiet: bool

    def validate(self) -> None: ...

    def key(self, run_dir: Path) -> dict[str, Any]: ...

    def missing(self, run_dir: Path) -> str | None: ...


O = TypeVar("O", bound=StageOptions)


@dataclass(frozen=True)
class Stage(Generic[O]):
    """A pipeline stage: its options type, its outputs in the run directory, and how to run it."""

    name: str
    options: type[O]
    # Runs the stage into the run directory with these options.
    run: Callable[[Path, O], object]
    # Files the stage writes into the run directory (hashed in the manifest).
    outputs: tuple[str, ...]
    # The options field naming the run directory (extract's --output); `iipad run` fills it.
    run_dir_field: str | None = None
    # The stage refuses to replace an earlier output made from other inputs unless --force
    # (extract, train); `iipad run` passes force when it reruns such a stage on purpose.
    replace_needs_force: bool = False


def weights_text(weights: Path | None) -> str | None:
    """--weights as the manifest records it."""
    return str(weights) if weights is not None else None


def at_least(flag: str, value: int | float, minimum: int | float) -> None:
    """The one check of "FLAG must be at least MINIMUM" (batch sizes, shots, workers, ...)."""
    if value < minimum:
        raise UsageError(f"{flag} must be at least {minimum}, got {value}")


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def device_name(value: str) -> None:
    """--device must name a device kind; whether that device exists is checked when it is used."""
    if not _DEVICE.fullmatch(value):
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {value!r}")


def backbone_id(value: str) -> None:
    from iipad_cli.models.registry import SPECS

    one_of("--backbone", value, tuple(SPECS))


def one_of(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{flag} must be {', '.join(choices[:-1])} or {choices[-1]}, not {value!r}")
