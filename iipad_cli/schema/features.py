"""`RUN/features.h5`: the frozen encoders' output per image, written by `extract`, read by every later stage.

Layout (design.md §2): groups `train` (the K shots per class) and `test`; per group `path`, `cls`,
`defect` (N,) str, `label` (N,) uint8, test-only `has_mask` (N,) bool and `mask` (N, R, R) bool,
and the fp16 features `cls_token` (N, 2, D), `qformer` (N, M, d), `vv` (N, Lv, P, D),
`mem` (N, Lm, P, W). Root attributes carry provenance and the options that define the content.

Datasets grow per batch with `resize` and are chunked per (image, layer) slab, uncompressed (fp16
tokens do not compress). Each group's `rows_written` attribute is updated only after a batch is
fully written and flushed, so an interrupted writer leaves a file that can be resumed exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    "schema_version",
    "precision",
)
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
    with _open(Path(path)) as handle:
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
