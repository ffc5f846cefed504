"""The one digest cache: a file is read once while (path, size, mtime_ns, inode) are unchanged."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import pytest

from iipad_cli import digests


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts the reads of each file by the cache, from a cold in-process cache."""
    counter: Counter = Counter()
    real = digests.read_digest

    def counting(path: Path) -> str:
        counter[str(Path(path).resolve())] += 1
        return real(path)

    digests.clear_memory()
    monkeypatch.setattr(digests, "read_digest", counting)
    yield counter
    digests.clear_memory()


def _backdate(path: Path, seconds: float = 60.0) -> None:
    """An mtime far enough in the past that the digest may be reused (not "racy")."""
    stamp = path.stat().st_mtime_ns - int(seconds * 1e9)
    os.utime(path, ns=(stamp, stamp))


def test_digest_is_sha256_and_read_once(tmp_path: Path, reads: Counter) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"some bytes" * 1000)
    _backdate(path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert [digests.sha256_file(path) for _ in range(3)] == [expected] * 3
    assert reads[str(path.resolve())] == 1


def test_a_replaced_file_is_read_again(tmp_path: Path, reads: Counter) -> None:
    """Same size and the same mtime, but written as NAME.tmp and renamed: a new inode."""
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    _backdate(path)
    first = digests.sha256_file(path)
    stamp = path.stat().st_mtime_ns
    tmp = tmp_path / "a.bin.tmp"
    tmp.write_bytes(b"y" * 100)
    os.utime(tmp, ns=(stamp, stamp))
    os.replace(tmp, path)
    assert digests.sha256_file(path) == hashlib.sha256(b"y" * 100).hexdigest() != first
    assert reads[str(path.resolve())] == 2


def test_a_rewritten_file_is_read_again(tmp_path: Path, reads: Counter) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    _backdate(path)
    digests.sha256_file(path)
    path.write_bytes(b"z" * 100)
    assert digests.sha256_file(path) == hashlib.sha256(b"z" * 100).hexdigest()


def test_a_just_written_file_is_not_trusted(tmp_path: Path, reads: Counter) -> None:
    """Timestamps are coarse: a digest taken right after a write is not reused."""
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"fresh")
    digests.sha256_file(path)
    digests.sha256_file(path)
    assert reads[str(path.resolve())] == 2


def test_big_files_are_remembered_across_processes(tmp_path: Path, reads: Counter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digests, "PERSIST_MIN_BYTES", 1000)
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(b"b" * 2000)
    small.write_bytes(b"s" * 10)
    for path in (big, small):
        _backdate(path)
        digests.sha256_file(path)
    digests.clear_memory()  # what a new process starts with
    assert digests.sha256_file(big) == hashlib.sha256(b"b" * 2000).hexdigest()
    digests.sha256_file(small)
    assert reads[str(big.resolve())] == 1
    assert reads[str(small.resolve())] == 2


def test_digests_json_is_parsed_once_per_process(tmp_path: Path, reads: Counter, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking many big files (a store's segments) parses digests.json once, not once per file."""
    monkeypatch.setenv("IIPAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "PERSIST_MIN_BYTES", 1000)
    files = [tmp_path / f"{index}.bin" for index in range(5)]
    for index, path in enumerate(files):
        path.write_bytes(bytes([index]) * 2000)
        _backdate(path)
        digests.sha256_file(path)
    digests.clear_memory()  # a new process: every digest is in digests.json only
    parsed: list[int] = []
    original = digests._load_persisted
    monkeypatch.setattr(digests, "_load_persisted", lambda: parsed.append(1) or original())
    for index, path in enumerate(files):
        assert digests.sha256_file(path) == hashlib.sha256(bytes([index]) * 2000).hexdigest()
    assert len(parsed) == 1
    assert all(reads[str(path.resolve())] == 1 for path in files)
