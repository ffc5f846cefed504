"""`RUN/features.h5`: the frozen encoders' output per image, written by `extract`, read by every later stage.

Layout (design.md §2): groups `train` (the K shots per class) and `test`; per group `path`, `cls`,
`defect` (N,) str, `label` (N,) uint8, test-only `has_mask` (N,) bool and `mask` (N, R, R) bool,
and the fp16 features `cls_token` (N, 2, D), `qformer` (N, M, d), `vv` (N, Lv, P, D),
`mem` (N, Lm, P, W). Root attributes carry provenance and the options that define the content.

This module holds the format's names and everything that reads a features file: the attributes,
the datasets of a split, the checks of its layout and of its compatibility with a stage's
backbone, layers and weights. The fp16 features are usually HDF5 virtual datasets into segments
of the feature store (`features_writer` writes them); readers open the file through
`open_features`, which refuses, in one line, a file whose store segments are gone (HDF5 would read
them as zeros).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from iipad_cli.artifacts import FEATURES_FILE
from iipad_cli.errors import IipadError
from iipad_cli.schema.check import Found, Spec, check_arrays

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
# The value an identity attribute has in files written before it existed (features were fp32).
ATTR_DEFAULTS = {"precision": "fp32"}


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


def _open(path: Path, hint: bool = True) -> h5py.File:
    """The file opened for reading; an unreadable features.h5 is one line with the extract command
    that rebuilds it (`hint`; off for the hint's own look at the file's attributes)."""
    try:
        return h5py.File(path, "r")
    except OSError as error:
        from iipad_cli.hints import extract_command

        fix = f"; rebuild it with {extract_command(path.parent, force=True)}" if hint and path.name == FEATURES_FILE else ""
        raise IipadError(f"{path}: not a readable features file ({str(error).splitlines()[0]}){fix}") from None


def missing_sources(handle: h5py.File) -> list[str]:
    """Store segments that the virtual feature datasets of an open features file point to but are gone."""
    sources: set[str] = set()
    for split in SPLITS:
        for name in FEATURE_FIELDS:
            dataset = handle.get(f"{split}/{name}")
            if dataset is not None and dataset.is_virtual:
                sources.update(source.file_name for source in dataset.virtual_sources())
    # Each segment file once: every field of every run of rows maps into the same few files.
    return sorted(name for name in sources if not Path(name).is_file())


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


def read_attrs(path: Path, hint: bool = True) -> dict[str, Any]:
    """Root attributes with JSON values decoded and integer arrays as lists (`hint`: see `_open`)."""
    with _open(Path(path), hint) as handle:
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
