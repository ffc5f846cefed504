"""The `bank` stage declared: its options, their checks and its currency key."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from iipad_cli import options as o
from iipad_cli.artifacts import BANKS_FILE
from iipad_cli.pipeline.score import DEFAULT_BATCH
from iipad_cli.pipeline.stage import Stage, at_least, device_name, weights_text


@dataclass(frozen=True)
class BankOptions:
    batch_size: o.described(o.BatchSize, "Shot images per generator + text-encoder pass.") = DEFAULT_BATCH
    seed: o.described(o.Seed, "Recorded for provenance; banking is deterministic (eval mode).") = 0
    weights: o.Weights = None
    device: o.Device = "auto"
    force: o.described(o.Force, "Use a generator trained on another features file or backbone.") = False
    quiet: o.Quiet = False

    def validate(self) -> None:
        at_least("--batch-size", self.batch_size, 1)
        device_name(self.device)

    def recorded(self) -> dict[str, Any]:
        return {**asdict(self), "weights": weights_text(self.weights)}

    def key(self, run_dir: Path) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "seed": self.seed, "weights": weights_text(self.weights)}

    def missing(self, run_dir: Path) -> Optional[str]:
        return None


def _run(run_dir: Path, options: BankOptions) -> None:
    from iipad_cli.stages.bank import build_banks

    build_banks(run_dir, options)


BANK = Stage("bank", BankOptions, _run, (BANKS_FILE,))
