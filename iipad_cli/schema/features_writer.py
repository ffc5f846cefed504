"""Writing `RUN/features.h5` (format and readers: `schema.features`).

`extract` writes the file in one go (`write_features_file`) from rows of the feature store: the
fp16 features are HDF5 virtual datasets mapping each row to its row in a store segment, so a run
directory holds no copy of them (or, with `--copy`, real datasets chunked per (image, layer) slab,
uncompressed: fp16 tokens do not compress). `FeaturesWriter` appends batches to a self-contained
file (tests build synthetic runs with it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from iipad_cli.schema.features import FEATURE_FIELDS, JSON_ATTRS, SPLITS, STRING_FIELDS
from iipad_cli.store.writer import slab_chunks
from iipad_cli.writes import HDF5_MARGIN_BYTES, abandoned, hdf5_writes, reporting_write_errors, require_space

# Rows copied from the store per read when a self-contained file is written.
COPY_ROWS = 32


@dataclass(frozen=True)
class FeatureShapes:
    """Per-image shapes of the feature datasets (without the leading N)."""

    cls_token: tuple[int, ...]
    qformer: tuple[int, ...]
    vv: tuple[int, ...]
    mem: tuple[int, ...]

    def of(self, name: str) -> tuple[int, ...]:
        return tuple(getattr(self, name))

    def by_field(self) -> dict[str, tuple[int, ...]]:
        """{field: per-image shape} of every stored feature, as the feature store takes them."""
        return {name: self.of(name) for name in FEATURE_FIELDS}


def _encode_attr(key: str, value: Any) -> Any:
    if key in JSON_ATTRS:
        return json.dumps(value, sort_keys=True)
    if isinstance(value, (list, tuple)):
        return np.asarray(value, dtype=np.int64)
    return value


class FeaturesWriter:
    """Appends images to a features file, creating or resuming it.

    Opening an existing file truncates every dataset of a group to its `rows_written`, dropping
    whatever an interrupted batch left behind. The free space is checked before every batch; a
    write that fails all the same is a one-line IipadError (`iipad_cli.writes.hdf5_writes`).
    """

    def __init__(self, path: Path, attrs: Mapping[str, Any], shapes: FeatureShapes, resolution: int) -> None:
        self.path = Path(path)
        exists = self.path.is_file()
        with reporting_write_errors(self.path):
            self.file = h5py.File(self.path, "a")
        # Every group and dataset stays open for the writer's life: a dataset object freed after a
        # failed write would write its cache again and fail outside any handler.
        self.groups: dict[str, h5py.Group] = {}
        self.datasets: dict[str, dict[str, h5py.Dataset]] = {}
        with hdf5_writes(self.path, self):
            self._prepare(exists, attrs, shapes, resolution)

    def _prepare(self, exists: bool, attrs: Mapping[str, Any], shapes: FeatureShapes, resolution: int) -> None:
        if not exists:
            for key, value in attrs.items():
                self.file.attrs[key] = _encode_attr(key, value)
            self.file.attrs["complete"] = False
            for split in SPLITS:
                self._create_group(split, shapes, resolution)
        for split in SPLITS:
            group = self.groups[split] = self.file[split]
            self.datasets[split] = dict(group.items())
            rows = int(group.attrs["rows_written"])
            for dataset in self.datasets[split].values():
                dataset.resize(rows, axis=0)

    def _create_group(self, split: str, shapes: FeatureShapes, resolution: int) -> None:
        group = self.file.create_group(split)
        group.attrs["rows_written"] = 0
        for name in STRING_FIELDS:
            group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(256,))
        group.create_dataset("label", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(1024,))
        if split == "test":
            group.create_dataset("has_mask", shape=(0,), maxshape=(None,), dtype=bool, chunks=(1024,))
            group.create_dataset(
                "mask",
                shape=(0, resolution, resolution),
                maxshape=(None, resolution, resolution),
                dtype=bool,
                chunks=(1, resolution, resolution),
            )
        for name in FEATURE_FIELDS:
            shape = shapes.of(name)
            group.create_dataset(
                name, shape=(0, *shape), maxshape=(None, *shape), dtype=np.float16, chunks=slab_chunks(shape)
            )

    def rows_written(self, split: str) -> int:
        return int(self.groups[split].attrs["rows_written"])

    def append(self, split: str, columns: Mapping[str, Sequence[str] | np.ndarray]) -> None:
        """Write one batch (every dataset of the group, same length), then mark it written and flush."""
        group, datasets = self.groups[split], self.datasets[split]
        start = self.rows_written(split)
        lengths = {len(values) for values in columns.values()}
        if len(lengths) != 1 or set(columns) != set(datasets):
            raise ValueError(f"batch for {split} must hold every dataset of the group with one length")
        stop = start + lengths.pop()
        require_space(self.path, sum(np.asarray(values).nbytes for values in columns.values()) + HDF5_MARGIN_BYTES)
        with hdf5_writes(self.path, self):
            for name, values in columns.items():
                dataset = datasets[name]
                dataset.resize(stop, axis=0)
                dataset[start:stop] = np.asarray(values, dtype=object) if name in STRING_FIELDS else values
            group.attrs["rows_written"] = stop
            self.file.flush()

    def mark_complete(self) -> None:
        with hdf5_writes(self.path, self):
            self.file.attrs["complete"] = True
            self.file.flush()

    def close(self) -> None:
        if self.file.id.valid and not abandoned(self):
            with hdf5_writes(self.path, self):
                self.groups, self.datasets = {}, {}
                self.file.close()

    def __enter__(self) -> FeaturesWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FeatureSource(Protocol):
    """Where one row's features are: row `row` of the `rows`-row segment file `file` (a store `Location`)."""

    file: Path
    row: int
    rows: int


def _source_runs(sources: Sequence[FeatureSource]) -> list[tuple[int, int, FeatureSource]]:
    """(start, length, first source) of each run of rows that are consecutive rows of one segment."""
    runs: list[tuple[int, int, FeatureSource]] = []
    for position, source in enumerate(sources):
        if runs:
            start, length, first = runs[-1]
            if source.file == first.file and source.row == first.row + length:
                runs[-1] = (start, length + 1, first)
                continue
        runs.append((position, 1, source))
    return runs


def _virtual_dataset(group: h5py.Group, name: str, shape: tuple[int, ...], sources: Sequence[FeatureSource]) -> None:
    layout = h5py.VirtualLayout(shape=(len(sources), *shape), dtype=np.float16)
    for start, length, first in _source_runs(sources):
        segment = h5py.VirtualSource(str(first.file), name, shape=(first.rows, *shape), dtype=np.float16)
        layout[start : start + length] = segment[first.row : first.row + length]
    group.create_virtual_dataset(name, layout, fillvalue=np.float16(np.nan))


def write_features_file(
    path: Path,
    attrs: Mapping[str, Any],
    shapes: FeatureShapes,
    columns: Mapping[str, Mapping[str, Sequence[str] | np.ndarray]],
    sources: Mapping[str, Sequence[FeatureSource]],
    copy_rows: Callable[[Sequence[FeatureSource], str], np.ndarray] | None = None,
) -> None:
    """Write a complete features file at `path` (the caller makes it atomic).

    `columns[split]` holds the per-image metadata (`path`, `cls`, `defect`, `label`, and for the
    test split `has_mask`, `mask`); `sources[split]` where each row's features are. Without
    `copy_rows` the features are virtual datasets into the segments; with it they are copied,
    `COPY_ROWS` rows at a time (`copy_rows(sources, field)` returns those rows' fp16 values).
    """
    with h5py.File(path, "w") as handle:
        for key, value in attrs.items():
            handle.attrs[key] = _encode_attr(key, value)
        handle.attrs["virtual"] = copy_rows is None
        for split in SPLITS:
            group = handle.create_group(split)
            rows = sources[split]
            for name, values in columns[split].items():
                if len(values) != len(rows):
                    raise ValueError(f"{split}/{name}: {len(values)} values for {len(rows)} rows")
                if name in STRING_FIELDS:
                    group.create_dataset(name, data=np.asarray(list(values), dtype=object), dtype=h5py.string_dtype())
                elif name == "mask":
                    # Masks are mostly zeros: compressed, they keep a virtual run directory small.
                    masks = np.asarray(values, dtype=bool)
                    if len(masks):
                        group.create_dataset(name, data=masks, chunks=(1, *masks.shape[1:]), compression="gzip")
                    else:
                        group.create_dataset(name, data=masks)
                else:
                    group.create_dataset(name, data=np.asarray(values))
            for name in FEATURE_FIELDS:
                shape = shapes.of(name)
                if copy_rows is None and rows:
                    _virtual_dataset(group, name, shape, rows)
                    continue
                dataset = group.create_dataset(name, shape=(len(rows), *shape), dtype=np.float16, chunks=slab_chunks(shape) if rows else None)
                for start in range(0, len(rows), COPY_ROWS):
                    assert copy_rows is not None
                    dataset[start : start + COPY_ROWS] = copy_rows(rows[start : start + COPY_ROWS], name)
            group.attrs["rows_written"] = len(rows)
        handle.attrs["complete"] = True
