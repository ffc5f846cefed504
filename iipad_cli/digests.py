"""One digest cache for every file iipad hashes (artifacts, weight files, shot images).

Stages and `iipad run` name their inputs and outputs by sha256, and the big ones are gigabytes:
a cached `iipad run` would otherwise read `features.h5` once per stage that lists it. A digest is
reused while the file's (resolved path, size, mtime_ns, inode) are unchanged: a rewrite changes
the mtime, an atomic replace (write NAME.tmp, rename) changes the inode. Digests live in memory
for the process and, for files of at least `PERSIST_MIN_BYTES`, in `digests.json` in iipad's
cache directory, so the next command does not re-read them either.

A digest taken less than `RACY_NS` after the file's mtime is never reused: file systems stamp
times at a coarse granularity, so a same-size rewrite right after hashing could keep the old
mtime (git calls this "racy" and handles it the same way).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PERSIST_MIN_BYTES = 16 << 20
RACY_NS = 2_000_000_000
CACHE_FILE = "digests.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class _Entry:
    size: int
    mtime_ns: int
    inode: int
    hashed_at_ns: int
    sha256: str

    def matches(self, stat: os.stat_result) -> bool:
        same = (self.size, self.mtime_ns, self.inode) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        return same and self.hashed_at_ns - self.mtime_ns > RACY_NS


_memory: dict[str, _Entry] = {}
# digests.json as this process last read or wrote it: parsed once, not on every miss (a store of
# 10^4 segments would otherwise parse it 10^4 times while checking them).
_persisted: dict[str, dict] | None = None


def clear_memory() -> None:
    """Forget the in-process digests (tests use it to count reads from a cold start)."""
    global _persisted
    _memory.clear()
    _persisted = None


def _cache_path() -> Path:
    from iipad_cli.store.location import resolve_cache_dir

    return resolve_cache_dir() / CACHE_FILE


def _load_persisted() -> dict[str, dict]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _persisted_entries() -> dict[str, dict]:
    global _persisted
    if _persisted is None:
        _persisted = _load_persisted()
    return _persisted


def _persist(name: str, entry: _Entry) -> None:
    """Add one entry to digests.json (atomic replace); a read-only cache only costs re-reading.

    Read again first, so that entries other processes added meanwhile are kept."""
    global _persisted
    path = _cache_path()
    data = _load_persisted()
    data[name] = asdict(entry)
    _persisted = data
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def read_digest(path: Path) -> str:
    """sha256 of the file's bytes, read in 1 MiB chunks (the only place a file is read to hash it)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file, read at most once while it is unchanged (see the module docstring)."""
    path = Path(path)
    stat = path.stat()
    name = str(path.resolve())
    cached = _memory.get(name)
    if cached is not None and cached.matches(stat):
        return cached.sha256
    persist = stat.st_size >= PERSIST_MIN_BYTES
    if persist:
        stored = _persisted_entries().get(name)
        try:
            entry = _Entry(**stored) if isinstance(stored, dict) else None
        except TypeError:
            entry = None
        if entry is not None and entry.matches(stat):
            _memory[name] = entry
            return entry.sha256
    hashed_at = time.time_ns()
    entry = _Entry(stat.st_size, stat.st_mtime_ns, stat.st_ino, hashed_at, read_digest(path))
    after = path.stat()
    if (after.st_size, after.st_mtime_ns, after.st_ino) != (stat.st_size, stat.st_mtime_ns, stat.st_ino):
        return entry.sha256  # changed while being read: correct for this call, not reusable
    _memory[name] = entry
    if persist and entry.hashed_at_ns - entry.mtime_ns > RACY_NS:
        _persist(name, entry)
    return entry.sha256
