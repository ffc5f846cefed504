"""K-shot selection: which K normal training images per class the model may see.

`official` reproduces the released code (sorted `train/good`, indices 0, 3, 6, 9, ...);
`random` draws K images per class with `--seed`, so results can be averaged over draws.
Candidates are sorted by path before either policy, so the choice never depends on the order in
which the filesystem lists files.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from iipad_cli.artifacts import sha256_file
from iipad_cli.data.layouts import Dataset, Sample
from iipad_cli.errors import IipadError

SHOT_POLICIES = ("random", "official")
# The released code takes train/good images i * 3 for i < K (reference-implementation.md §4).
OFFICIAL_STRIDE = 3


@dataclass(frozen=True)
class ShotFile:
    """A chosen training image, recorded in `features.h5` so a run can be audited and repeated."""

    rel_path: str
    sha256: str


def _official(candidates: list[Sample], k: int, cls: str) -> list[Sample]:
    last = OFFICIAL_STRIDE * (k - 1)
    if last >= len(candidates):
        raise IipadError(
            f"class {cls!r}: --shot-policy official takes train/good images 0, 3, 6, ... and needs index {last}, "
            f"but there are only {len(candidates)} normal images"
        )
    return [candidates[OFFICIAL_STRIDE * i] for i in range(k)]


def _random(candidates: list[Sample], k: int, cls: str, seed: int) -> list[Sample]:
    """The first K of a seeded permutation, so a K-shot draw extends the (K-1)-shot draw of the same seed.

    The generator is seeded with the seed *and* the class name, so classes draw independently and
    adding a class to `--classes` does not change the others' shots.
    """
    order = list(range(len(candidates)))
    random.Random(f"iipad-shots:{seed}:{cls}").shuffle(order)
    return [candidates[i] for i in order[:k]]


def select_shots(dataset: Dataset, k: int, policy: str, seed: int) -> list[Sample]:
    """K normal training images per class, in the data set's class order."""
    if policy not in SHOT_POLICIES:
        raise IipadError(f"unknown shot policy {policy!r}; choose one of: {', '.join(SHOT_POLICIES)}")
    if k < 1:
        raise IipadError(f"--shots must be at least 1, got {k}")
    chosen: list[Sample] = []
    for cls in dataset.classes:
        candidates = sorted((s for s in dataset.train if s.cls == cls and s.label == 0), key=lambda s: s.rel_path)
        if len(candidates) < k:
            where = candidates[0].path.parent if candidates else dataset.root / cls
            raise IipadError(f"class {cls!r}: only {len(candidates)} normal training images ({where}), fewer than --shots {k}")
        picked = _official(candidates, k, cls) if policy == "official" else _random(candidates, k, cls, seed)
        chosen.extend(picked)
    return chosen


def shot_files(shots: Sequence[Sample]) -> dict[str, list[ShotFile]]:
    """Chosen files per class with their sha256 (the file contents, not just the names, define a run)."""
    files: dict[str, list[ShotFile]] = {}
    for sample in shots:
        files.setdefault(sample.cls, []).append(ShotFile(sample.rel_path, sha256_file(sample.path)))
    return files
