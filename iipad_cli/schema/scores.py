"""`RUN/scores.h5`: anomaly maps, image scores and their components for the test split.

Datasets (rows in the order of `features.h5:test`):
  path, cls, defect (N,) str · label (N,) uint8 · has_mask (N,) bool
  maps (N, R, R) f16 final pixel maps (eq. 18, upsampled and smoothed)
  image_score (N,) f32 per the preset's formula
  prompt_max, visual_max, p_normal, retrieval_sim (N,) f32 — the components, so either image-score
  formula can be evaluated without rescoring (`paper` = prompt_max + visual_max; `official` =
  that − p_normal − retrieval_sim)
  retrieved (N, k) int32 indices into the banks (their paths are in the `bank_paths` attribute)
Attributes: preset (JSON), image_score_formula, backbone_id, random_weights, shots, seed,
resolution, top_k, sigma, data_root, features_sha256, generator_sha256, banks_sha256, bank_paths
(JSON), map_min/map_max (range over all maps, the heatmaps' shared scale), complete, provenance.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from iipad_cli.artifacts import atomic_path
from iipad_cli.errors import IipadError

COMPONENTS = ("image_score", "prompt_max", "visual_max", "p_normal", "retrieval_sim")
STRING_COLUMNS = ("path", "cls", "defect")


@dataclass
class Scores:
    """scores.h5 in memory (maps as float16, as stored)."""

    path: list[str]
    cls: list[str]
    defect: list[str]
    label: np.ndarray
    has_mask: np.ndarray
    maps: np.ndarray
    image_score: np.ndarray
    prompt_max: np.ndarray
    visual_max: np.ndarray
    p_normal: np.ndarray
    retrieval_sim: np.ndarray
    retrieved: np.ndarray
    attrs: dict[str, Any]


class ScoresWriter:
    """Appends batches of rows to an open scores file whose size is known in advance."""

    def __init__(self, handle: h5py.File, count: int, resolution: int, top_k: int) -> None:
        self.handle = handle
        self.count = count
        self.rows = 0
        self.map_min = float("inf")
        self.map_max = float("-inf")
        string = h5py.string_dtype()
        for name in STRING_COLUMNS:
            handle.create_dataset(name, shape=(count,), dtype=string)
        handle.create_dataset("label", shape=(count,), dtype=np.uint8)
        handle.create_dataset("has_mask", shape=(count,), dtype=bool)
        handle.create_dataset(
            "maps", shape=(count, resolution, resolution), dtype=np.float16, chunks=(1, resolution, resolution)
        )
        for name in COMPONENTS:
            handle.create_dataset(name, shape=(count,), dtype=np.float32)
        handle.create_dataset("retrieved", shape=(count, top_k), dtype=np.int32)

    def append(self, columns: dict[str, Any]) -> None:
        """Write one batch: every dataset's rows for the next len(columns['path']) images."""
        size = len(columns["path"])
        rows = slice(self.rows, self.rows + size)
        for name in STRING_COLUMNS:
            self.handle[name][rows] = list(columns[name])
        self.handle["label"][rows] = np.asarray(columns["label"], dtype=np.uint8)
        self.handle["has_mask"][rows] = np.asarray(columns["has_mask"], dtype=bool)
        maps = np.asarray(columns["maps"], dtype=np.float16)
        self.handle["maps"][rows] = maps
        if size:
            self.map_min = min(self.map_min, float(maps.min()))
            self.map_max = max(self.map_max, float(maps.max()))
        for name in COMPONENTS:
            self.handle[name][rows] = np.asarray(columns[name], dtype=np.float32)
        self.handle["retrieved"][rows] = np.asarray(columns["retrieved"], dtype=np.int32)
        self.rows += size


@contextmanager
def write_scores(path: Path, count: int, resolution: int, top_k: int, attrs: dict[str, Any]) -> Iterator[ScoresWriter]:
    """Create scores.h5 atomically: it appears under its name only once every row is written."""
    with atomic_path(Path(path)) as tmp:
        with h5py.File(tmp, "w") as handle:
            for key, value in attrs.items():
                handle.attrs[key] = value
            writer = ScoresWriter(handle, count, resolution, top_k)
            yield writer
            if writer.rows != count:
                raise RuntimeError(f"scores: wrote {writer.rows} of {count} rows")
            handle.attrs["map_min"] = writer.map_min if count else 0.0
            handle.attrs["map_max"] = writer.map_max if count else 0.0
            handle.attrs["complete"] = True


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_scores_attrs(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as handle:
            attrs = {key: _attr(value) for key, value in handle.attrs.items()}
    except OSError as error:
        raise IipadError(f"{path}: not a readable HDF5 file ({error})") from None
    if not attrs.get("complete"):
        raise IipadError(f"{path}: incomplete scores file; run `iipad score` again")
    return attrs


def load_scores(path: Path) -> Scores:
    attrs = read_scores_attrs(path)
    with h5py.File(path, "r") as handle:
        strings = {name: [str(v) for v in handle[name].asstr()[()]] for name in STRING_COLUMNS}
        arrays = {name: handle[name][()] for name in ("label", "has_mask", "maps", "retrieved", *COMPONENTS)}
    return Scores(**strings, **arrays, attrs=attrs)


def bank_paths(attrs: dict[str, Any]) -> list[str]:
    return list(json.loads(attrs["bank_paths"]))
