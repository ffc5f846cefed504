"""The `extract` stage declared: its options, their checks, its currency key and its output."""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from iipad_cli import options as o
from iipad_cli.artifacts import FEATURES_FILE, sha256_json
from iipad_cli.pipeline.stage import Stage, at_least, backbone_id, device_name, one_of, weights_text

if TYPE_CHECKING:
    from iipad_cli.data.layouts import Dataset, Sample


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def default_run_dir(data: Path, shots: int) -> Path:
    """design.md §1: `runs/<data-dir-name>-<K>shot` when `-o` is omitted."""
    return Path("runs") / f"{Path(data).resolve().name}-{shots}shot"


def listing_digest(dataset: "Dataset") -> str:
    """Hash of the image listing, so a data folder that gained or lost files is not mixed into a file."""
    rows = [
        [s.split, s.rel_path, s.cls, s.defect, s.label, s.mask_path.as_posix() if s.mask_path else None]
        for s in (*dataset.train, *dataset.test)
    ]
    return sha256_json(rows)


def content_keys(samples: "Sequence[Sample]") -> list[str]:
    """The sha256 of each sample's file bytes (the feature store's content key).

    Through the one digest cache, so `iipad run` (deciding whether extract is current) and the
    extract it calls read each file once; a file rewritten in place is hashed again.
    """
    from iipad_cli.errors import IipadError
    from iipad_cli.store import content_sha256

    keys = []
    for sample in samples:
        try:
            keys.append(content_sha256(sample.path))
        except OSError as error:
            raise IipadError(f"{sample.path}: unreadable image ({error.strerror})") from None
    return keys


def content_digest(splits: "dict[str, Sequence[Sample]]", keys: "dict[str, list[str]] | None" = None) -> str:
    """One hash of every (split, path, content sha256) a run reads: changed bytes under the same name show.

    `keys` (per split, as `content_keys` returns them) when already known, e.g. gathered from the
    torchrun ranks that hashed the images.
    """
    keys = keys if keys is not None else {split: content_keys(samples) for split, samples in splits.items()}
    return sha256_json([[split, sample.rel_path, key] for split, samples in splits.items() for sample, key in zip(samples, keys[split])])


@dataclass(frozen=True)
class ExtractOptions:
    """The options of `iipad extract` (see `iipad extract --help`)."""

    data: o.DataArg
    shots: o.Shots
    output: o.Output = None
    backbone: o.Backbone = "vit-l-14"
    weights: o.Weights = None
    layout: o.Layout = "auto"
    classes: o.Classes = None
    shot_policy: o.ShotPolicy = "random"
    seed: o.described(o.Seed, "Seed of the random K-shot draw.") = 0
    resolution: o.MaskResolution = 224
    batch_size: o.BatchSize = 8
    workers: o.Workers = None
    device: o.Device = "auto"
    # fp32 by default: bf16 rounding makes features depend on the batch they were computed in
    # (docs/protocol.md), so predict would no longer reproduce score's maps bit for bit.
    precision: o.Precision = "fp32"
    force: o.described(o.Force, "Replace features made with other options (another precision too).") = False
    quiet: o.Quiet = False
    cache: o.Cache = None
    copy: o.Copy = False

    # Recorded, but the features do not depend on them (the store holds the same features
    # wherever it is; the precision counts as resolved, not as asked for).
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"batch_size", "workers", "device", "cache", "precision_requested"})

    def validate(self) -> None:
        from iipad_cli.data.layouts import LAYOUTS
        from iipad_cli.data.shots import SHOT_POLICIES

        at_least("--shots", self.shots, 1)
        one_of("--layout", self.layout, LAYOUTS)
        one_of("--shot-policy", self.shot_policy, SHOT_POLICIES)
        backbone_id(self.backbone)
        device_name(self.device)
        at_least("--resolution", self.resolution, 1)
        at_least("--batch-size", self.batch_size, 1)
        if self.workers is not None:
            at_least("--workers", self.workers, 0)
        self.resolved_precision()

    def resolved_precision(self) -> str:
        """--precision as the features are computed: "fp32" or "bf16" (auto decided for --device)."""
        from iipad_cli.devices import resolve_device, resolve_precision

        return resolve_precision(self.precision, resolve_device(self.device))

    def splits(self, dataset: "Dataset") -> "dict[str, list[Sample]]":
        """The images a run reads: the K shots per class (train) and the test set."""
        from iipad_cli.data.shots import select_shots

        return {"train": select_shots(dataset, self.shots, self.shot_policy, self.seed), "test": list(dataset.test)}

    def recorded(self, dataset: "Dataset", content_sha256: str | None = None) -> dict[str, Any]:
        """The options as RUN/manifest.json records them (paths resolved by the data layout).

        `content_sha256` makes image bytes that changed under the same names a reason to rerun;
        a caller that has it already passes it (torchrun's rank 0 holds only its own shard's
        file hashes, and hashing every image again would undo sharing the hashing).
        """
        return {
            "data": str(dataset.root),
            "samples_sha256": listing_digest(dataset),
            "content_sha256": content_digest(self.splits(dataset)) if content_sha256 is None else content_sha256,
            "shots": self.shots,
            "backbone": self.backbone,
            "weights": weights_text(self.weights),
            "layout": dataset.layout,
            "classes": list(dataset.classes),
            "shot_policy": self.shot_policy,
            "seed": self.seed,
            "resolution": self.resolution,
            "batch_size": self.batch_size,
            "workers": default_workers() if self.workers is None else self.workers,
            "device": self.device,
            "copy": self.copy,
            "cache": str(self.cache) if self.cache is not None else None,
            # The features depend on the precision they were computed in, not on how it was asked for.
            "precision": self.resolved_precision(),
            "precision_requested": self.precision,
        }

    def key(self, run_dir: Path) -> dict[str, Any]:
        from iipad_cli.data.layouts import load_dataset

        recorded = self.recorded(load_dataset(self.data, self.layout, self.classes))
        return {name: value for name, value in recorded.items() if name not in self.NOT_IN_KEY}

    def missing(self, run_dir: Path) -> Optional[str]:
        return None


def _run(run_dir: Path, options: ExtractOptions) -> None:
    from dataclasses import replace

    from iipad_cli.stages.extract import run_extract

    run_extract(replace(options, output=run_dir))


EXTRACT = Stage("extract", ExtractOptions, _run, (FEATURES_FILE,), run_dir_field="output", replace_needs_force=True)
