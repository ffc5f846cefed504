"""`StoreWriter`: one process's (or torchrun rank's) new rows, in segments of its own.

A writer grows its own `<id>.h5.tmp`, which nobody else opens; when it is full, has been open
long enough, or the writer closes, it is flushed, fsynced, hashed and renamed to `<id>.h5`, and
only then are its rows committed to the index. A sealed segment never changes again. So a process
killed at any moment leaves at most an unindexed `.tmp` or `.h5` file (reclaimed by `verify
--repair`), never an index row that points at missing or half-written bytes. The writer holds an
exclusive `flock` on `<id>.lock` until its rows are in the index (a segment handed to another
process to index keeps it until that process has), which is how repair tells a dead writer's
leftovers from a live one's.
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from iipad_cli.artifacts import fsync_dir
from iipad_cli.digests import read_digest
from iipad_cli.store.index import SegmentRecord
from iipad_cli.store.keys import STORE_SCHEMA_VERSION, BackboneKey
from iipad_cli.writes import abandoned, hdf5_writes

if TYPE_CHECKING:
    from iipad_cli.store.store import FeatureStore

SEGMENT_SUFFIX = ".h5"
TMP_SUFFIX = ".h5.tmp"
LOCK_SUFFIX = ".lock"
CONTENT_FIELD = "content"
# A segment is sealed (and its rows indexed) once it holds about this many bytes: large enough
# for few files, small enough that a killed writer loses little work.
DEFAULT_SEGMENT_BYTES = 256 << 20
# A segment is also sealed once it has been open this long, which bounds the work a killed writer
# loses on slow hardware (a CPU encodes a ViT-L/14 segment's 100 images in minutes).
SEAL_SECONDS_ENV = "IIPAD_STORE_SEAL_SECONDS"
DEFAULT_SEAL_SECONDS = 60.0


def row_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The fp16 bytes of one image's features (`shapes`: per field, without the leading N)."""
    return sum(2 * int(np.prod(shape)) for shape in shapes.values())


def slab_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """HDF5 chunks of one image, and one layer where the per-image shape has a layer axis
    (L, P, width): the store's segments and a self-contained features.h5 share this layout."""
    if len(shape) == 3:
        return (1, 1, *shape[1:])
    return (1, *shape)


def try_lock(path: Path, wait: bool = False) -> int | None:
    """An fd holding an exclusive flock on `path` (created if needed), or None when someone holds it.

    A writer waits (`wait`): a concurrent `info`/`verify` may hold its fresh lock for an instant.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int, path: Path) -> None:
    path.unlink(missing_ok=True)
    os.close(fd)


class StoreWriter:
    """Appends encoded images to this writer's own segments; use as a context manager.

    `add` takes a batch (content sha256s and one fp16 array per field). A segment is sealed and
    committed (indexed, or handed to the `commit` hook) when it is full, when it has been open
    `$IIPAD_STORE_SEAL_SECONDS` (default 60 s) and when the writer closes, also after an exception
    (the rows written so far are complete batches, so an interrupted extract keeps them); a batch
    whose own write failed makes the writer discard its open segment instead.
    """

    def __init__(
        self,
        store: FeatureStore,
        key: BackboneKey,
        shapes: dict[str, tuple[int, ...]],
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        commit: Callable[[SegmentRecord, list[str]], int] | None = None,
    ) -> None:
        """`commit` replaces indexing a sealed segment in this process's index connection: a torchrun
        rank on another host than the index's hands the record to rank 0 instead (SQLite's WAL mode
        needs every connection on one host). Such a segment keeps its lock until
        `release_handed_over`, called once the receiver has indexed it."""
        self.store = store
        self._commit = commit
        self.key = key
        self.shapes = shapes
        self.rows_per_segment = max(1, segment_bytes // row_bytes(shapes))
        self.seal_seconds = float(os.environ.get(SEAL_SECONDS_ENV, DEFAULT_SEAL_SECONDS))
        self._opened = 0.0
        self.new_images = 0  # contents this writer indexed first
        self.handed_over: list[tuple[int, Path]] = []  # locks of sealed segments the hook has not indexed
        self._file: h5py.File | None = None
        self._contents: list[str] = []
        self._segment_id = ""
        self._lock_fd: int | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._broken = False

    def _paths(self) -> tuple[Path, Path, Path]:
        directory = self.store.segment_dir(self.key.digest)
        stem = directory / self._segment_id
        return stem.with_name(stem.name + TMP_SUFFIX), stem.with_name(stem.name + SEGMENT_SUFFIX), stem.with_name(stem.name + LOCK_SUFFIX)

    def _open_segment(self) -> h5py.File:
        self._segment_id = uuid.uuid4().hex
        tmp, _, lock = self._paths()
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = try_lock(lock, wait=True)
        handle = h5py.File(tmp, "w")
        handle.attrs["store_schema_version"] = STORE_SCHEMA_VERSION
        handle.attrs["backbone_key"] = self.key.digest
        handle.create_dataset(CONTENT_FIELD, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(256,))
        for name, shape in self.shapes.items():
            handle.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=np.float16, chunks=slab_chunks(shape))
        # Held for the segment's life: h5py objects freed after a failed write crash the interpreter.
        self._datasets = {name: handle[name] for name in (CONTENT_FIELD, *self.shapes)}
        self._contents = []
        self._opened = time.monotonic()
        return handle

    def add(self, contents: Sequence[str], features: Mapping[str, np.ndarray]) -> None:
        if set(features) != set(self.shapes):
            raise ValueError(f"features must hold exactly {sorted(self.shapes)}, got {sorted(features)}")
        for name, values in features.items():
            if values.shape != (len(contents), *self.shapes[name]):
                raise ValueError(f"{name}: shape {values.shape}, expected {(len(contents), *self.shapes[name])}")
        start = 0
        while start < len(contents):
            if self._file is None:
                self._file = self._open_segment()
            take = min(len(contents) - start, self.rows_per_segment - len(self._contents))
            self._write(contents[start : start + take], {n: v[start : start + take] for n, v in features.items()})
            start += take
            if len(self._contents) >= self.rows_per_segment or time.monotonic() - self._opened >= self.seal_seconds:
                self.seal()

    def _write(self, contents: Sequence[str], features: Mapping[str, np.ndarray]) -> None:
        assert self._file is not None
        begin, stop = len(self._contents), len(self._contents) + len(contents)
        try:
            # A failed HDF5 write leaves a file the library cannot close: abandoned, see writes.py.
            with hdf5_writes(self._paths()[0], self):
                self._write_rows(begin, stop, contents, features)
        except BaseException:
            self._broken = True
            raise
        self._contents.extend(contents)

    def _write_rows(self, begin: int, stop: int, contents: Sequence[str], features: Mapping[str, np.ndarray]) -> None:
        assert self._file is not None
        for name, values in features.items():
            self._datasets[name].resize(stop, axis=0)
            self._datasets[name][begin:stop] = np.asarray(values, dtype=np.float16)
        self._datasets[CONTENT_FIELD].resize(stop, axis=0)
        self._datasets[CONTENT_FIELD][begin:stop] = np.asarray(list(contents), dtype=object)

    def seal(self) -> None:
        """Flush, fsync, hash and rename the open segment, then index its rows (in that order)."""
        if self._file is None:
            return
        tmp, final, lock = self._paths()
        if self._lock_fd is None:
            return  # an abandoned segment, already dropped
        try:
            if abandoned(self):
                # Never closed (the HDF5 library would crash); its bytes are dropped.
                tmp.unlink(missing_ok=True)
                return
            if self._broken or not self._contents:
                self._datasets = {}
                self._file.close()
                self._file = None
                tmp.unlink(missing_ok=True)
                return
            try:
                with hdf5_writes(tmp, self):
                    # Flushed while the datasets are held: a full disk fails here, not in a finaliser.
                    self._file.flush()
                    self._datasets = {}
                    self._file.close()
            except BaseException:
                tmp.unlink(missing_ok=True)  # never indexed; its images are encoded again
                raise
            self._file = None
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            record = SegmentRecord(
                id=self._segment_id,
                backbone=self.key.digest,
                file=final.relative_to(self.store.root).as_posix(),
                rows=len(self._contents),
                bytes=tmp.stat().st_size,
                sha256=read_digest(tmp),
            )
            # Read-only: a run's features.h5 opened for writing must not write through into the store.
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            commit = self._commit if self._commit is not None else self.store.index.commit_segment
            self.new_images += commit(record, list(self._contents))
            if self._commit is None:
                self.store.sealed_here(record.id)
            else:
                # Indexed later, by whoever received the record: until then the lock tells
                # `verify --repair` that the sealed file belongs to a live writer.
                self.handed_over.append((self._lock_fd, lock))
                self._lock_fd = None
        finally:
            if self._lock_fd is not None:
                unlock(self._lock_fd, lock)
            self._lock_fd = None
            self._contents = []

    def release_handed_over(self) -> None:
        """Drop the locks of the segments handed to the `commit` hook, once they are indexed (or,
        after a failure, never will be: then `verify --repair` may reclaim them)."""
        for fd, lock in self.handed_over:
            unlock(fd, lock)
        self.handed_over = []

    def close(self) -> None:
        self.seal()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
