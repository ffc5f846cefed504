"""The store's index: an SQLite database in WAL mode (`CACHE/index.sqlite`).

Tables: `meta` (the store schema version), `backbones` (one row per backbone key: what it means
and the per-image feature shapes), `segments` (one row per sealed segment file: path relative to
the store root, rows, sha256 of the file) and `features` ((backbone key, content sha256) ->
(segment, row), the primary key, so one image is indexed once per backbone key whatever the
number of writers). Every write is one `BEGIN IMMEDIATE` transaction with `synchronous=FULL`, so
a commit is on disk when it returns and a killed process leaves either all or none of it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iipad_cli.errors import IipadError
from iipad_cli.store.keys import STORE_SCHEMA_VERSION

INDEX_FILE = "index.sqlite"
# How long a writer waits for another process's transaction before giving up (seconds).
BUSY_TIMEOUT_S = 120.0
# SQLite's default limit of host parameters is 999 in old builds: look contents up in chunks.
LOOKUP_CHUNK = 500

_TABLES = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE backbones (key TEXT PRIMARY KEY, description TEXT NOT NULL, shapes TEXT NOT NULL);
CREATE TABLE segments (
    id TEXT PRIMARY KEY, backbone TEXT NOT NULL, file TEXT NOT NULL,
    rows INTEGER NOT NULL, bytes INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE features (
    backbone TEXT NOT NULL, content TEXT NOT NULL, segment TEXT NOT NULL, row INTEGER NOT NULL,
    PRIMARY KEY (backbone, content)) WITHOUT ROWID;
CREATE INDEX features_by_segment ON features (segment);
CREATE INDEX segments_by_backbone ON segments (backbone);
"""


@dataclass(frozen=True)
class SegmentRecord:
    id: str
    backbone: str
    file: str  # relative to the store root
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class IndexedRow:
    content: str
    segment: SegmentRecord
    row: int


def way_out(root: Path) -> str:
    return f"run `iipad cache verify --repair --cache {root}` or `iipad cache clear --all --cache {root}`"


class Index:
    """One connection to the index database; create it with `Index.open`."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self.connection = connection
        self.path = path

    @classmethod
    def open(cls, root: Path) -> Index:
        """Open (creating if needed) the index under `root`; a store of another schema version is refused."""
        path = root / INDEX_FILE
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
                # Switching a new database to WAL does not wait for another process creating it at
                # the same moment ("database is locked" at once): that case is retried.
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")
                index = cls(connection, path)
                index._initialise(root)
                return index
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise IipadError(f"{path}: not a readable feature store index ({error}); {way_out(root)}") from None
                connection.close()
                time.sleep(0.05)
            except sqlite3.DatabaseError as error:
                raise IipadError(f"{path}: not a readable feature store index ({error}); {way_out(root)}") from None

    def _initialise(self, root: Path) -> None:
        with self.transaction():
            exists = self.connection.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
            if not exists:
                for statement in _TABLES.strip().split(";"):
                    if statement.strip():
                        self.connection.execute(statement)
                self.connection.execute(
                    "INSERT INTO meta (name, value) VALUES ('store_schema_version', ?)", (str(STORE_SCHEMA_VERSION),)
                )
        row = self.connection.execute("SELECT value FROM meta WHERE name='store_schema_version'").fetchone()
        version = int(row[0]) if row else None
        if version != STORE_SCHEMA_VERSION:
            raise IipadError(
                f"{self.path}: feature store schema version {version}, this iipad reads version {STORE_SCHEMA_VERSION}; "
                f"run `iipad cache clear --all --cache {root}` or pass another --cache"
            )

    def transaction(self) -> _Transaction:
        return _Transaction(self.connection)

    def close(self) -> None:
        self.connection.close()

    # -- backbones --------------------------------------------------------------------------------

    def ensure_backbone(self, key: str, description: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        """Record a backbone key; one already recorded must have the same per-image shapes."""
        shapes_json = json.dumps({name: list(shape) for name, shape in shapes.items()}, sort_keys=True)
        with self.transaction():
            row = self.connection.execute("SELECT shapes FROM backbones WHERE key=?", (key,)).fetchone()
            if row is None:
                self.connection.execute(
                    "INSERT INTO backbones (key, description, shapes) VALUES (?, ?, ?)",
                    (key, json.dumps(description, sort_keys=True), shapes_json),
                )
            elif row[0] != shapes_json:
                raise IipadError(f"{self.path}: backbone key {key[:12]} is recorded with shapes {row[0]}, not {shapes_json}")

    def backbones(self) -> dict[str, dict[str, Any]]:
        """key -> {"description": ..., "shapes": ...}."""
        rows = self.connection.execute("SELECT key, description, shapes FROM backbones ORDER BY key").fetchall()
        return {key: {"description": json.loads(desc), "shapes": json.loads(shapes)} for key, desc, shapes in rows}

    def shapes(self, key: str) -> dict[str, tuple[int, ...]] | None:
        row = self.connection.execute("SELECT shapes FROM backbones WHERE key=?", (key,)).fetchone()
        return None if row is None else {name: tuple(shape) for name, shape in json.loads(row[0]).items()}

    # -- segments and rows ------------------------------------------------------------------------

    def commit_segment(self, segment: SegmentRecord, contents: Sequence[str]) -> int:
        """Index a sealed segment (its row i holds `contents[i]`); returns how many contents were new.

        A content another writer indexed first keeps its row; this segment's copy is then unused.
        """
        with self.transaction():
            self.connection.execute(
                "INSERT INTO segments (id, backbone, file, rows, bytes, sha256) VALUES (?, ?, ?, ?, ?, ?)",
                (segment.id, segment.backbone, segment.file, segment.rows, segment.bytes, segment.sha256),
            )
            before = self.connection.total_changes
            self.connection.executemany(
                "INSERT OR IGNORE INTO features (backbone, content, segment, row) VALUES (?, ?, ?, ?)",
                [(segment.backbone, content, segment.id, row) for row, content in enumerate(contents)],
            )
            return self.connection.total_changes - before

    def lookup(self, key: str, contents: Iterable[str]) -> dict[str, IndexedRow]:
        wanted = sorted(set(contents))
        found: dict[str, IndexedRow] = {}
        for start in range(0, len(wanted), LOOKUP_CHUNK):
            chunk = wanted[start : start + LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self.connection.execute(
                "SELECT f.content, f.row, s.id, s.backbone, s.file, s.rows, s.bytes, s.sha256 "
                f"FROM features f JOIN segments s ON s.id = f.segment WHERE f.backbone=? AND f.content IN ({marks})",
                (key, *chunk),
            ).fetchall()
            for content, row, *segment in rows:
                found[content] = IndexedRow(content, SegmentRecord(*segment), int(row))
        return found

    def segments(self, key: str | None = None) -> list[SegmentRecord]:
        query = "SELECT id, backbone, file, rows, bytes, sha256 FROM segments"
        rows = self.connection.execute(query + (" WHERE backbone=?" if key else "") + " ORDER BY id", (key,) if key else ())
        return [SegmentRecord(*row) for row in rows.fetchall()]

    def segment_rows(self, segment_id: str) -> list[tuple[str, int]]:
        """(content, row) of the index entries that point into one segment."""
        rows = self.connection.execute("SELECT content, row FROM features WHERE segment=? ORDER BY row", (segment_id,))
        return [(content, int(row)) for content, row in rows.fetchall()]

    def is_indexed(self, segment_id: str) -> bool:
        return self.connection.execute("SELECT 1 FROM segments WHERE id=?", (segment_id,)).fetchone() is not None

    def image_counts(self) -> dict[str, int]:
        rows = self.connection.execute("SELECT backbone, COUNT(*) FROM features GROUP BY backbone").fetchall()
        return {key: int(count) for key, count in rows}

    def drop_segments(self, segment_ids: Sequence[str]) -> None:
        with self.transaction():
            for segment_id in segment_ids:
                self.connection.execute("DELETE FROM features WHERE segment=?", (segment_id,))
                self.connection.execute("DELETE FROM segments WHERE id=?", (segment_id,))

    def drop_backbone(self, key: str) -> None:
        with self.transaction():
            self.connection.execute("DELETE FROM features WHERE backbone=?", (key,))
            self.connection.execute("DELETE FROM segments WHERE backbone=?", (key,))
            self.connection.execute("DELETE FROM backbones WHERE key=?", (key,))

    def integrity_problems(self) -> list[str]:
        rows = self.connection.execute("PRAGMA integrity_check").fetchall()
        return [] if rows == [("ok",)] else [str(row[0]) for row in rows]


class _Transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT` (or `ROLLBACK` on an exception): one writer at a time, all or nothing."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __enter__(self) -> None:
        self.connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.connection.execute("ROLLBACK" if exc_type is not None else "COMMIT")
