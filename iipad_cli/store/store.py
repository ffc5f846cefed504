"""`FeatureStore`: look images up, hand out writers, read rows, info, verify, repair, clear.

Segments (`CACHE/segments/<key[:16]>/<id>.h5`) hold the fp16 features of one writer's images in
row order plus each row's content sha256; how a writer (`writer.py`, one per process or torchrun
rank) seals them so that a kill never leaves an index row pointing at missing bytes is told
there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from iipad_cli.digests import read_digest, sha256_file
from iipad_cli.errors import IipadError
from iipad_cli.store.index import INDEX_FILE, Index, IndexedRow, SegmentRecord, way_out
from iipad_cli.store.keys import STORE_SCHEMA_VERSION, BackboneKey
from iipad_cli.store.writer import (
    CONTENT_FIELD,
    DEFAULT_SEGMENT_BYTES,
    LOCK_SUFFIX,
    TMP_SUFFIX,
    StoreWriter,
    try_lock,
)

SEGMENTS_DIR = "segments"
# Rows read at once when verify reads a segment back.
READ_ROWS = 64


@dataclass(frozen=True)
class Location:
    """Where one image's features are: row `row` of the sealed segment file `file` (`rows` rows)."""

    content: str
    file: Path
    row: int
    rows: int
    segment_id: str


@dataclass
class BackboneInfo:
    key: str
    description: dict[str, Any]
    shapes: dict[str, list[int]]
    images: int
    segments: int
    bytes: int


@dataclass
class StoreInfo:
    root: Path
    exists: bool
    bytes: int = 0
    backbones: list[BackboneInfo] = field(default_factory=list)
    reclaimable: list[Path] = field(default_factory=list)


@dataclass
class VerifyReport:
    segments_checked: int = 0
    rows_checked: int = 0
    problems: list[str] = field(default_factory=list)
    reclaimable: list[Path] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


class FeatureStore:
    """A feature store rooted at `root` (see `resolve_cache_dir`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._index: Index | None = None
        self._verified: set[str] = set()

    # -- opening ----------------------------------------------------------------------------------

    @property
    def index(self) -> Index:
        """The index, created on first use; other schema versions and damaged files are one-line errors."""
        if self._index is None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise IipadError(f"{self.root}: cannot create the feature store ({error.strerror})") from None
            self._index = Index.open(self.root)
        return self._index

    def exists(self) -> bool:
        return (self.root / INDEX_FILE).is_file()

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def segment_dir(self, key: str) -> Path:
        return self.root / SEGMENTS_DIR / key[:16]

    # -- lookup and reading -----------------------------------------------------------------------

    def lookup(self, key: BackboneKey, contents: Iterable[str]) -> dict[str, Location]:
        """The stored location of each content that the store holds for this backbone key."""
        if not self.exists():
            return {}
        found = self.index.lookup(key.digest, contents)
        return {content: self._location(row) for content, row in found.items()}

    def _location(self, indexed: IndexedRow) -> Location:
        segment = indexed.segment
        return Location(indexed.content, self.root / segment.file, indexed.row, segment.rows, segment.id)

    def check_segments(self, locations: Iterable[Location]) -> None:
        """Refuse (one line naming the segment and the way out) to serve rows of a missing or damaged segment.

        Each segment's file is hashed against the sha256 recorded when it was sealed, once per
        FeatureStore object, so a damaged segment never yields a wrong feature.
        """
        segments = {location.segment_id: location.file for location in locations if location.segment_id not in self._verified}
        records = {record.id: record for record in self.index.segments()} if segments else {}
        for segment_id, path in sorted(segments.items()):
            record = records.get(segment_id)
            problem = self._segment_problem(path, record) if record else "no longer indexed"
            if problem:
                raise IipadError(f"{path}: feature store segment {problem}; {way_out(self.root)}")
            self._verified.add(segment_id)

    def sealed_here(self, segment_id: str) -> None:
        """A segment this process sealed, hashed and indexed through this store: `check_segments`
        need not read its bytes again."""
        self._verified.add(segment_id)

    @staticmethod
    def _segment_problem(path: Path, record: SegmentRecord, reread: bool = False) -> str | None:
        """Why a sealed segment cannot be served, or None. `reread` hashes the bytes even when the
        digest cache knows the file unchanged (verify's full check, which also finds bit rot)."""
        if not path.is_file():
            return "missing"
        if path.stat().st_size != record.bytes:
            return f"damaged (size {path.stat().st_size} bytes, sealed at {record.bytes})"
        if (read_digest(path) if reread else sha256_file(path)) != record.sha256:
            return "damaged (sha256 differs from the one recorded when it was sealed)"
        return None

    def read(self, locations: Sequence[Location], name: str) -> np.ndarray:
        """The field `name` of each location, stacked in the given order (fp16)."""
        by_file: dict[Path, list[int]] = {}
        for location in locations:
            by_file.setdefault(location.file, []).append(location.row)
        values: dict[tuple[Path, int], np.ndarray] = {}
        for path, rows in by_file.items():
            unique = sorted(set(rows))  # h5py reads a list of rows only in increasing order
            with h5py.File(path, "r") as handle:
                block = handle[name][unique]
            values.update({(path, row): block[i] for i, row in enumerate(unique)})
        return np.stack([values[(location.file, location.row)] for location in locations])

    # -- writing ----------------------------------------------------------------------------------

    def writer(
        self, key: BackboneKey, shapes: Mapping[str, tuple[int, ...]], segment_bytes: int = DEFAULT_SEGMENT_BYTES
    ) -> StoreWriter:
        """A writer of new rows for `key`: one per process (or torchrun rank), each with its own segments."""
        self.index.ensure_backbone(key.digest, key.to_json(), dict(shapes))
        return StoreWriter(self, key, dict(shapes), segment_bytes)

    # -- info, verify, repair, clear --------------------------------------------------------------

    def _files(self) -> list[Path]:
        base = self.root / SEGMENTS_DIR
        return sorted(path for path in base.rglob("*") if path.is_file()) if base.is_dir() else []

    def _unindexed(self) -> list[Path]:
        """Leftovers of writers that are gone: tmp and sealed segment files without index rows, stale locks."""
        indexed = {self.root / record.file for record in self.index.segments()}
        leftovers = []
        for path in self._files():
            if path in indexed:
                continue
            if path.name.endswith(LOCK_SUFFIX):
                segment_id = path.name[: -len(LOCK_SUFFIX)]
            elif path.name.endswith(TMP_SUFFIX):
                segment_id = path.name[: -len(TMP_SUFFIX)]
            else:
                segment_id = path.stem
            lock = path.with_name(segment_id + LOCK_SUFFIX)
            fd = try_lock(lock) if lock.exists() else None
            if lock.exists() and fd is None:
                continue  # a live writer holds it
            if fd is not None:
                os.close(fd)
            leftovers.append(path)
        return leftovers

    def info(self) -> StoreInfo:
        if not self.exists():
            return StoreInfo(self.root, exists=False)
        files = self._files()
        info = StoreInfo(self.root, exists=True, bytes=sum(p.stat().st_size for p in files))
        info.bytes += sum(p.stat().st_size for p in self.root.glob(INDEX_FILE + "*") if p.is_file())
        counts = self.index.image_counts()
        for key, meta in self.index.backbones().items():
            segments = self.index.segments(key)
            info.backbones.append(
                BackboneInfo(key, meta["description"], meta["shapes"], counts.get(key, 0), len(segments), sum(s.bytes for s in segments))
            )
        info.reclaimable = self._unindexed()
        return info

    def verify(self, repair: bool = False) -> VerifyReport:
        """Check every indexed row is readable and every segment matches its checksum; optionally repair.

        Repair drops the index rows of damaged or missing segments (those images are encoded
        again by the next extract), deletes those files and the leftovers of dead writers.
        """
        report = VerifyReport()
        if not self.exists():
            return report
        report.problems.extend(f"{self.index.path}: {line}" for line in self.index.integrity_problems())
        if report.problems:
            report.problems[-1] += f"; run `iipad cache clear --all --cache {self.root}`"
            return report
        backbones = self.index.backbones()
        damaged: list[SegmentRecord] = []
        for record in self.index.segments():
            report.segments_checked += 1
            path = self.root / record.file
            shapes = backbones.get(record.backbone, {}).get("shapes")
            problem = self._segment_problem(path, record, reread=True) or self._rows_problem(path, record, shapes, report)
            if problem:
                report.problems.append(f"{path}: {problem}")
                damaged.append(record)
        report.reclaimable = self._unindexed()
        if repair:
            self.index.drop_segments([record.id for record in damaged])
            for record in damaged:
                (self.root / record.file).unlink(missing_ok=True)
            for path in report.reclaimable:
                path.unlink(missing_ok=True)
            report.repaired = True
        return report

    def _rows_problem(self, path: Path, record: SegmentRecord, shapes: dict[str, list[int]] | None, report: VerifyReport) -> str | None:
        """Read every indexed row of a segment back and compare its content column with the index."""
        rows = self.index.segment_rows(record.id)
        try:
            with h5py.File(path, "r") as handle:
                if int(handle.attrs["store_schema_version"]) != STORE_SCHEMA_VERSION or handle.attrs["backbone_key"] != record.backbone:
                    return "written for another store schema or backbone key"
                contents = handle[CONTENT_FIELD].asstr()[...]
                for name, shape in (shapes or {}).items():
                    dataset = handle[name]
                    if tuple(dataset.shape) != (record.rows, *shape):
                        return f"{name} has shape {dataset.shape}, expected {(record.rows, *shape)}"
                    for start in range(0, record.rows, READ_ROWS):
                        dataset[start : start + READ_ROWS]
        except (OSError, KeyError, ValueError) as error:
            return f"unreadable ({str(error).splitlines()[0]})"
        for content, row in rows:
            if row >= len(contents) or contents[row] != content:
                return f"row {row} holds another image than the index says"
        report.rows_checked += len(rows)
        return None

    def clear(self, key_prefix: str | None = None) -> tuple[list[str], int]:
        """Remove one backbone key (a unique prefix of its digest) or, with None, everything; returns (keys, bytes freed)."""
        if key_prefix is None:
            if not self.exists() and not (self.root / SEGMENTS_DIR).exists():
                return [], 0
            files = self._files() + [p for p in self.root.glob(INDEX_FILE + "*") if p.is_file()]
            freed = sum(p.stat().st_size for p in files)
            keys = list(self.index.backbones()) if self._readable_index() else []
            self.close()
            shutil.rmtree(self.root / SEGMENTS_DIR, ignore_errors=True)
            for path in self.root.glob(INDEX_FILE + "*"):
                path.unlink(missing_ok=True)
            return keys, freed
        if not self.exists():
            raise IipadError(f"{self.root}: no feature store here")
        matches = [key for key in self.index.backbones() if key.startswith(key_prefix)]
        if len(matches) != 1:
            found = "no" if not matches else f"{len(matches)}"
            raise IipadError(f"{self.root}: {found} backbone keys start with {key_prefix!r}; see `iipad cache info`")
        key = matches[0]
        directory = self.segment_dir(key)
        freed = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0
        self.index.drop_backbone(key)
        shutil.rmtree(directory, ignore_errors=True)
        return [key], freed

    def _readable_index(self) -> bool:
        try:
            self.index
        except IipadError:
            return False
        return True
