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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from iipad_cli.artifacts import atomic_path, shell_path
from iipad_cli.errors import IipadError
from iipad_cli.schema.check import Found, Spec, check_arrays
from iipad_cli.writes import HDF5_MARGIN_BYTES, abandoned, hdf5_writes, require_space

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
        # Kept open for the writer's life: a dataset object freed after a failed write would
        # write its cache again and fail outside any handler.
        self.datasets = {
            name: handle.create_dataset(name, dtype=spec.dtype if spec.dtype != "object" else h5py.string_dtype(),
                                        shape=tuple(count if dim == "N" else dim for dim in spec.shape),
                                        chunks=(1, resolution, resolution) if name == "maps" else None)
            for name, spec in expected_layout(resolution, top_k).items()
        }

    def append(self, columns: dict[str, Any]) -> None:
        """Write one batch: every dataset's rows for the next len(columns['path']) images."""
        size = len(columns["path"])
        rows = slice(self.rows, self.rows + size)
        maps = np.asarray(columns["maps"], dtype=np.float16)
        if size:
            self.map_min = min(self.map_min, float(maps.min()))
            self.map_max = max(self.map_max, float(maps.max()))
        for name, dataset in self.datasets.items():
            values = maps if name == "maps" else columns[name]
            dataset[rows] = list(values) if name in STRING_COLUMNS else np.asarray(values, dtype=dataset.dtype)
        self.rows += size


def scores_bytes(count: int, resolution: int, top_k: int) -> int:
    """About what a scores file of `count` rows takes on disk (maps dominate), for the space check."""
    return count * (2 * resolution * resolution + 4 * len(COMPONENTS) + 4 * top_k + 256) + HDF5_MARGIN_BYTES


@contextmanager
def write_scores(path: Path, count: int, resolution: int, top_k: int, attrs: dict[str, Any]) -> Iterator[ScoresWriter]:
    """Create scores.h5 atomically: it appears under its name only once every row is written.

    The free space is checked before any work; a write that fails all the same is one line,
    and no `scores.h5.tmp` is left (`iipad_cli.writes`).
    """
    path = Path(path)
    require_space(path, scores_bytes(count, resolution, top_k))
    with atomic_path(path) as tmp:
        handle = h5py.File(tmp, "w")
        # The file and the writer's datasets, abandoned together if a write fails (`hdf5_writes`).
        objects: list[object] = [handle]
        try:
            with hdf5_writes(path, objects):
                for key, value in attrs.items():
                    handle.attrs[key] = value
                writer = ScoresWriter(handle, count, resolution, top_k)
                objects.append(writer)
                yield writer
                if writer.rows != count:
                    raise RuntimeError(f"scores: wrote {writer.rows} of {count} rows")
                handle.attrs["map_min"] = writer.map_min if count else 0.0
                handle.attrs["map_max"] = writer.map_max if count else 0.0
                handle.attrs["complete"] = True
                writer.datasets = {}
                handle.close()
        finally:
            if handle.id.valid and not abandoned(objects):
                handle.close()


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def expected_layout(resolution: int, top_k: int) -> dict[str, Spec]:
    """Every dataset of a scores file, with its dtype and shape (N test images)."""
    return {
        **{name: Spec("object", ("N",)) for name in STRING_COLUMNS},
        "label": Spec("uint8", ("N",)),
        "has_mask": Spec("bool", ("N",)),
        "maps": Spec("float16", ("N", resolution, resolution)),
        **{name: Spec("float32", ("N",)) for name in COMPONENTS},
        "retrieved": Spec("int32", ("N", top_k)),
    }


def read_scores_attrs(path: Path) -> dict[str, Any]:
    """The attributes of a complete scores file whose datasets match the schema exactly."""
    try:
        with h5py.File(path, "r") as handle:
            attrs = {key: _attr(value) for key, value in handle.attrs.items()}
            found = {name: Found(str(item.dtype), tuple(item.shape)) for name, item in handle.items() if isinstance(item, h5py.Dataset)}
            groups = sorted(name for name, item in handle.items() if not isinstance(item, h5py.Dataset))
    except OSError as error:
        raise IipadError(f"{path}: not a readable HDF5 file ({str(error).splitlines()[0]}); rewrite it with `iipad score {shell_path(Path(path).parent)}`") from None
    if not attrs.get("complete"):
        raise IipadError(f"{path}: incomplete scores file; rewrite it with `iipad score {shell_path(Path(path).parent)}`")
    if groups:
        raise IipadError(f"{path}: not a valid scores file (has unexpected {', '.join(groups)})")
    check_arrays(path, found, expected_layout(int(attrs["resolution"]), int(attrs["top_k"])), "scores file")
    return attrs


def read_scores_columns(path: Path, names: Sequence[str]) -> dict[str, Any]:
    """Some columns of a complete scores file, without the maps (string columns as lists of str)."""
    read_scores_attrs(path)
    with h5py.File(path, "r") as handle:
        return {
            name: [str(v) for v in handle[name].asstr()[()]] if name in STRING_COLUMNS else handle[name][()]
            for name in names
        }


def load_scores(path: Path) -> Scores:
    attrs = read_scores_attrs(path)
    with h5py.File(path, "r") as handle:
        strings = {name: [str(v) for v in handle[name].asstr()[()]] for name in STRING_COLUMNS}
        arrays = {name: handle[name][()] for name in ("label", "has_mask", "maps", "retrieved", *COMPONENTS)}
    return Scores(**strings, **arrays, attrs=attrs)
