"""`RUN/features.h5`: the frozen encoders' output per image, written by `extract`, read by every later stage.

Layout (design.md §2): groups `train` (the K shots per class) and `test`; per group `path`, `cls`,
`defect` (N,) str, `label` (N,) uint8, test-only `has_mask` (N,) bool and `mask` (N, R, R) bool,
and the fp16 features `cls_token` (N, 2, D), `qformer` (N, M, d), `vv` (N, Lv, P, D),
`mem` (N, Lm, P, W). Root attributes carry provenance and the options that define the content.

`extract` writes the file in one go (`write_features_file`) from rows of the feature store: the
fp16 features are HDF5 virtual datasets mapping each row to its row in a store segment, so a run
directory holds no copy of them (or, with `--copy`, real datasets chunked per (image, layer) slab,
uncompressed: fp16 tokens do not compress). Readers open the file through `open_features`, which
refuses, in one line, a file whose store segments are gone (HDF5 would read them as zeros).
`FeaturesWriter` appends batches to a self-contained file (tests build synthetic runs with it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from iipad_cli.artifacts import FEATURES_FILE
from iipad_cli.errors import IipadError
from iipad_cli.schema.check import Found, Spec, check_arrays
from iipad_cli.writes import HDF5_MARGIN_BYTES, abandoned, hdf5_writes, reporting_write_errors, require_space

SPLITS = ("train", "test")
STRING_FIELDS = ("path", "cls", "defect")
FEATURE_FIELDS = ("cls_token", "qformer", "vv", "mem")
# Attributes stored as JSON strings (everything else is a native HDF5 scalar or integer array).
JSON_ATTRS = frozenset({"backbone_spec", "weights", "weights_sha256", "classes", "shots_files", "preprocessing"})
# Attributes whose values define the file's content: a re-run with other values must not mix in.
IDENTITY_ATTRS = (
    "backbone_id",
    "random_weights",
    "weights_sha256",
    "shots",
    "seed",
    "shot_policy",
    "layout",
    "classes",
    "resolution",
    "image_size",
    "data_root",
    "samples_sha256",
    "content_sha256",
    "schema_version",
    "precision",
)
# Rows copied from the store per read when a self-contained file is written.
COPY_ROWS = 32
# The value an identity attribute has in files written before it existed (features were fp32).
ATTR_DEFAULTS = {"precision": "fp32"}


@dataclass(frozen=True)
class FeatureShapes:
    """Per-image shapes of the feature datasets (without the leading N)."""

    cls_token: tuple[int, ...]
    qformer: tuple[int, ...]
    vv: tuple[int, ...]
    mem: tuple[int, ...]

    def of(self, name: str) -> tuple[int, ...]:
        return tuple(getattr(self, name))


def _encode_attr(key: str, value: Any) -> Any:
    if key in JSON_ATTRS:
        return json.dumps(value, sort_keys=True)
    if isinstance(value, (list, tuple)):
        return np.asarray(value, dtype=np.int64)
    return value


def _decode_attr(key: str, value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if key in JSON_ATTRS:
        return json.loads(value)
    if isinstance(value, np.ndarray):
        return [item.item() for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _chunk(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One image, and one layer where the per-image shape has a layer axis (L, P, width)."""
    if len(shape) == 3:
        return (1, 1, *shape[1:])
    return (1, *shape)


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
                name, shape=(0, *shape), maxshape=(None, *shape), dtype=np.float16, chunks=_chunk(shape)
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


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as error:
        from iipad_cli.hints import extract_command

        fix = f"; rebuild it with {extract_command(path.parent, force=True)}" if path.name == FEATURES_FILE else ""
        raise IipadError(f"{path}: not a readable features file ({str(error).splitlines()[0]}){fix}") from None


def missing_sources(handle: h5py.File) -> list[str]:
    """Store segments that the virtual feature datasets of an open features file point to but are gone."""
    missing: set[str] = set()
    for split in SPLITS:
        for name in FEATURE_FIELDS:
            dataset = handle.get(f"{split}/{name}")
            if dataset is not None and dataset.is_virtual:
                missing.update(source.file_name for source in dataset.virtual_sources() if not Path(source.file_name).is_file())
    return sorted(missing)


def open_features(path: Path) -> h5py.File:
    """A features file opened for reading, its store segments (if virtual) all present."""
    handle = _open(Path(path))
    gone = missing_sources(handle)
    if gone:
        handle.close()
        more = f" and {len(gone) - 1} more" if len(gone) > 1 else ""
        raise IipadError(
            f"{path}: its features are in a feature store segment that is gone ({gone[0]}{more}; store cleared or moved); "
            "re-run `iipad extract` with the same options to encode them again"
        )
    return handle


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
                dataset = group.create_dataset(name, shape=(len(rows), *shape), dtype=np.float16, chunks=_chunk(shape) if rows else None)
                for start in range(0, len(rows), COPY_ROWS):
                    assert copy_rows is not None
                    dataset[start : start + COPY_ROWS] = copy_rows(rows[start : start + COPY_ROWS], name)
            group.attrs["rows_written"] = len(rows)
        handle.attrs["complete"] = True


def read_attrs(path: Path) -> dict[str, Any]:
    """Root attributes with JSON values decoded and integer arrays as lists."""
    with _open(Path(path)) as handle:
        return {key: _decode_attr(key, value) for key, value in handle.attrs.items()}


def read_split(path: Path, split: str, fields: Iterable[str] | None = None) -> dict[str, np.ndarray | list[str]]:
    """The datasets `fields` (default: all) of one split; strings as `list[str]`, the rest as arrays.

    Feature arrays are returned as stored (fp16); convert where the computation needs more.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    with open_features(Path(path)) as handle:
        group = handle[split]
        names = list(group.keys()) if fields is None else list(fields)
        missing = [name for name in names if name not in group]
        if missing:
            raise IipadError(f"{path}: {split} has no dataset {', '.join(missing)}")
        out: dict[str, np.ndarray | list[str]] = {}
        for name in names:
            dataset = group[name]
            out[name] = list(dataset.asstr()[...]) if name in STRING_FIELDS else dataset[...]
        return out


def load_features_attrs(path: Path) -> dict[str, Any]:
    """Attributes of a complete features file; a missing or unfinished file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise IipadError(f"{path}: missing; run `iipad extract` first")
    attrs = read_attrs(path)
    if not attrs.get("complete", False):
        from iipad_cli.hints import extract_command

        raise IipadError(f"{path}: incomplete features file; finish it with {extract_command(path.parent, force=False)}")
    check_layout(path, attrs)
    return attrs


def features_precision(attrs: Mapping[str, Any]) -> str:
    """The precision a features file was computed in (files from before `--precision` are fp32)."""
    return str(attrs.get("precision", ATTR_DEFAULTS["precision"]))


def expected_layout(split: str, attrs: Mapping[str, Any]) -> dict[str, Spec]:
    """Every dataset of one split, with its dtype and shape (N images of the split)."""
    layout = {
        **{name: Spec("object", ("N",)) for name in STRING_FIELDS},
        "label": Spec("uint8", ("N",)),
        "cls_token": Spec("float16", ("N", 2, "D")),
        "qformer": Spec("float16", ("N", "M", "d")),
        "vv": Spec("float16", ("N", len(attrs["vv_layers"]), "P", "D")),
        "mem": Spec("float16", ("N", len(attrs["memory_layers"]), "P", "W")),
    }
    if split == "test":
        resolution = int(attrs["resolution"])
        layout["has_mask"] = Spec("bool", ("N",))
        layout["mask"] = Spec("bool", ("N", resolution, resolution))
    return layout


def check_layout(path: Path, attrs: Mapping[str, Any]) -> None:
    """Refuse a features file whose groups or datasets differ from the schema (names, dtypes, shapes)."""
    missing = [key for key in ("vv_layers", "memory_layers", "resolution") if key not in attrs]
    if missing:
        raise IipadError(f"{path}: not a valid features file (no attribute {', '.join(missing)})")
    with _open(Path(path)) as handle:
        groups = sorted(handle.keys())
        if groups != sorted(SPLITS):
            raise IipadError(f"{path}: not a valid features file (groups {groups}, expected {list(SPLITS)})")
        for split in SPLITS:
            group = handle[split]
            found = {name: Found(str(item.dtype), tuple(item.shape)) for name, item in group.items() if isinstance(item, h5py.Dataset)}
            if len(found) != len(group):
                raise IipadError(f"{path}: not a valid features file ({split} holds a group)")
            dims = check_arrays(path, found, expected_layout(split, attrs), "features file")
            if dims["N"] != int(group.attrs["rows_written"]):
                raise IipadError(f"{path}: {split} holds {dims['N']} rows but records {int(group.attrs['rows_written'])}")


def differing_attrs(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Names of the identity attributes whose stored and expected values differ."""
    return [
        key
        for key in IDENTITY_ATTRS
        if key in expected and stored.get(key, ATTR_DEFAULTS.get(key)) != expected[key]
    ]


def check_features_compatible(
    attrs: Mapping[str, Any],
    *,
    path: Path,
    backbone_id: str | None = None,
    vv_layers: Sequence[int] | None = None,
    memory_layers: Sequence[int] | None = None,
    resolution: int | None = None,
    shots: int | None = None,
    force: bool = False,
) -> None:
    """Refuse (IipadError naming the file) features made for another backbone, layers, resolution or K.

    Later stages call it before mixing their own artifacts with a features file; `force` turns
    the refusal off for users who know what they are doing.
    """
    if force:
        return
    wanted = {
        "backbone_id": backbone_id,
        "vv_layers": list(vv_layers) if vv_layers is not None else None,
        "memory_layers": list(memory_layers) if memory_layers is not None else None,
        "resolution": resolution,
        "shots": shots,
    }
    for key, value in wanted.items():
        if value is not None and attrs.get(key) != value:
            raise IipadError(
                f"{path}: made with {key} {attrs.get(key)!r}, not {value!r}; re-run `iipad extract` or pass --force"
            )


def check_backbone_weights(path: Path, stored: dict[str, str], loaded: dict[str, str], backbone_id: str) -> None:
    """The encoders must be the ones the features were extracted with (compared by hash: the
    weight files may have moved)."""
    if sorted(stored.values()) != sorted(loaded.values()):
        raise IipadError(
            f"{path}: extracted with other {backbone_id} weights ({sorted(stored.values())}) than the ones loaded "
            f"({sorted(loaded.values())}); pass the same --weights directory"
        )
