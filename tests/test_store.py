"""The feature store on its own: keys, location, write/lookup/read, sealing, schema and damage
errors, verify/repair/clear, two concurrent writer processes and writers killed at random moments."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from iipad_cli.errors import IipadError
from iipad_cli.store import BackboneKey, FeatureStore, StoreWriter, resolve_cache_dir
from iipad_cli.store.index import INDEX_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"cls_token": (2, 4), "vv": (2, 3, 4)}
KEY = BackboneKey.for_backbone("tiny", {"layers": [1, 2]}, ["random"], 64, "fp32")


def content(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def features_of(contents: list[str]) -> dict[str, np.ndarray]:
    """Deterministic features derived from the content key, so any process can check what it reads."""
    rows = np.array([int(c[:6], 16) % 1000 for c in contents], dtype=np.float16)
    return {name: np.broadcast_to(rows.reshape(-1, *([1] * len(shape))), (len(contents), *shape)).copy() for name, shape in SHAPES.items()}


def write(store: FeatureStore, contents: list[str], segment_bytes: int = 1 << 20, batch: int = 2) -> int:
    with store.writer(KEY, SHAPES, segment_bytes) as writer:
        for start in range(0, len(contents), batch):
            chunk = contents[start : start + batch]
            writer.add(chunk, features_of(chunk))
    return writer.new_images


def test_cache_location_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IIPAD_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == (tmp_path / "home" / ".cache" / "iipad").resolve()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == (tmp_path / "xdg" / "iipad").resolve()
    monkeypatch.setenv("IIPAD_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir() == (tmp_path / "env").resolve()
    assert resolve_cache_dir(tmp_path / "option") == (tmp_path / "option").resolve()


def test_backbone_key_changes_with_every_part() -> None:
    base = dict(backbone_id="tiny", spec_json={"layers": [1]}, weights_sha256=["b", "a"], image_size=64, precision="fp32")
    digest = BackboneKey.for_backbone(**base).digest
    assert BackboneKey.for_backbone(**{**base, "weights_sha256": ["a", "b"]}).digest == digest  # order-free
    for change in (
        {"backbone_id": "vit-l-14"},
        {"spec_json": {"layers": [2]}},
        {"weights_sha256": ["a", "c"]},
        {"image_size": 224},
        {"precision": "bf16"},
    ):
        assert BackboneKey.for_backbone(**{**base, **change}).digest != digest, change
    key = BackboneKey.for_backbone(**base)
    assert BackboneKey(**{**key.__dict__, "preprocessing_version": 2}).digest != digest
    assert BackboneKey(**{**key.__dict__, "feature_schema_version": 2}).digest != digest


def test_write_lookup_read_and_only_sealed_rows_are_indexed(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "cache")
    contents = [content(i) for i in range(7)]
    # Three rows per segment: after two batches of 2 one segment (3 rows) is sealed and indexed.
    row_bytes = 2 * (2 * 4 + 2 * 3 * 4)
    writer = store.writer(KEY, SHAPES, segment_bytes=3 * row_bytes)
    writer.add(contents[:2], features_of(contents[:2]))
    assert store.lookup(KEY, contents) == {}
    writer.add(contents[2:4], features_of(contents[2:4]))
    assert set(store.lookup(KEY, contents)) == set(contents[:3])
    writer.add(contents[4:], features_of(contents[4:]))
    writer.close()
    assert writer.new_images == 7
    found = store.lookup(KEY, [*contents, content(99)])
    assert set(found) == set(contents)
    order = [contents[5], contents[0], contents[5], contents[3]]
    locations = [found[c] for c in order]
    store.check_segments(locations)
    for name in SHAPES:
        np.testing.assert_array_equal(store.read(locations, name), features_of(order)[name])
    assert len({found[c].file for c in contents}) == 3  # 3 + 3 + 1 rows
    other = BackboneKey.for_backbone("tiny", {"layers": [1, 2]}, ["random"], 64, "bf16")
    assert store.lookup(other, contents) == {}
    # A second writer of the same images adds nothing new to the index.
    assert write(store, contents[:3]) == 0
    report = store.verify()
    assert report.ok and report.rows_checked == 7


def test_segments_are_hashed_once_by_the_process_that_seals_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer hashes a segment when it seals it; checking it through the same store does not
    read its bytes again, while another store object (another process) hashes each segment once."""
    import iipad_cli.digests as digests

    store = FeatureStore(tmp_path / "cache")
    contents = [content(i) for i in range(5)]
    write(store, contents, segment_bytes=2 * 2 * (2 * 4 + 2 * 3 * 4))  # 2 rows per segment: 3 segments
    read: list[Path] = []
    original = digests.read_digest
    monkeypatch.setattr(digests, "read_digest", lambda path: read.append(Path(path)) or original(path))
    digests.clear_memory()
    found = store.lookup(KEY, contents)
    store.check_segments(found.values())
    assert read == []
    other = FeatureStore(store.root)
    other.check_segments(other.lookup(KEY, contents).values())
    other.check_segments(other.lookup(KEY, contents).values())
    assert sorted(read) == sorted({location.file for location in found.values()}) and len(read) == 3


def test_info_and_clear(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "cache")
    write(store, [content(i) for i in range(4)])
    other = BackboneKey.for_backbone("tiny", {"layers": [1, 2]}, ["random"], 64, "bf16")
    with store.writer(other, SHAPES) as writer:
        writer.add([content(0)], features_of([content(0)]))
    info = store.info()
    assert {b.key: b.images for b in info.backbones} == {KEY.digest: 4, other.digest: 1}
    assert info.bytes > 0
    keys, freed = store.clear(other.digest[:10])
    assert keys == [other.digest] and freed > 0
    assert store.lookup(other, [content(0)]) == {} and len(store.lookup(KEY, [content(0)])) == 1
    with pytest.raises(IipadError, match="no backbone keys start with"):
        store.clear("ffffffffffff")
    store.clear(None)
    assert not (tmp_path / "cache" / INDEX_FILE).exists() and not (tmp_path / "cache" / "segments").exists()
    assert FeatureStore(tmp_path / "cache").lookup(KEY, [content(0)]) == {}


def test_other_schema_version_and_unreadable_index_are_one_line_errors(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    write(FeatureStore(root), [content(0)])
    connection = sqlite3.connect(root / INDEX_FILE)
    connection.execute("UPDATE meta SET value='999' WHERE name='store_schema_version'")
    connection.commit()
    connection.close()
    with pytest.raises(IipadError) as error:
        FeatureStore(root).lookup(KEY, [content(0)])
    message = str(error.value)
    assert "\n" not in message and "schema version 999" in message and "iipad cache clear --all" in message
    FeatureStore(root).clear(None)  # the way out works on a store of another version
    assert write(FeatureStore(root), [content(0)]) == 1

    for path in root.glob(INDEX_FILE + "*"):
        path.unlink()
    (root / INDEX_FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(IipadError) as error:
        FeatureStore(root).lookup(KEY, [content(0)])
    assert "\n" not in str(error.value) and "not a readable feature store index" in str(error.value)


def test_damaged_segment_is_refused_verified_and_repaired(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "cache")
    contents = [content(i) for i in range(6)]
    row_bytes = 2 * (2 * 4 + 2 * 3 * 4)
    write(store, contents, segment_bytes=3 * row_bytes)
    found = store.lookup(KEY, contents)
    damaged = found[contents[0]].file
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(IipadError) as error:
        FeatureStore(store.root).check_segments(found.values())
    assert "\n" not in str(error.value) and str(damaged) in str(error.value) and "verify --repair" in str(error.value)
    report = store.verify()
    assert not report.ok and len(report.problems) == 1 and str(damaged) in report.problems[0]
    repaired = store.verify(repair=True)
    assert repaired.repaired and not damaged.exists()
    assert store.verify().ok
    # The damaged segment's images are missing now, so the next writer encodes exactly those.
    missing = [c for c in contents if c not in store.lookup(KEY, contents)]
    assert missing == contents[:3]
    assert write(store, missing) == 3
    assert store.verify().ok and set(store.lookup(KEY, contents)) == set(contents)


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_store import FeatureStore, KEY, SHAPES, content, features_of
    store = FeatureStore({root!r})
    contents = [content(i) for i in range({count})]
    missing = [c for c in contents if c not in store.lookup(KEY, contents)]
    print("start", flush=True)
    with store.writer(KEY, SHAPES, segment_bytes={segment_bytes}) as writer:
        for start in range(0, len(missing), 2):
            chunk = missing[start : start + 2]
            writer.add(chunk, features_of(chunk))
            time.sleep({pause})
    print(len(missing), writer.new_images, flush=True)
    """
)


def writer_process(root: Path, count: int, pause: float, segment_bytes: int = 4 * 2 * (2 * 4 + 2 * 3 * 4)) -> subprocess.Popen[str]:
    script = WRITER_SCRIPT.format(tests=str(REPO_ROOT / "tests"), root=str(root), count=count, pause=pause, segment_bytes=segment_bytes)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def assert_complete_and_correct(store: FeatureStore, contents: list[str]) -> None:
    found = store.lookup(KEY, contents)
    assert set(found) == set(contents)
    locations = [found[c] for c in contents]
    for name in SHAPES:
        np.testing.assert_array_equal(store.read(locations, name), features_of(contents)[name])


def test_segments_handed_to_a_commit_hook_stay_locked_until_released(tmp_path: Path) -> None:
    """A torchrun rank on another node than rank 0 hands its sealed segments to rank 0, which
    indexes them when every rank is done: until the rank releases them, `verify --repair` must
    not take them for a dead writer's leftovers."""
    store = FeatureStore(tmp_path / "cache")
    store.index.ensure_backbone(KEY.digest, KEY.to_json(), SHAPES)
    handed: list = []
    first, second = [content(i) for i in range(3)], [content(i) for i in range(3, 5)]
    writers = []
    for contents in (first, second):
        with StoreWriter(store, KEY, SHAPES, commit=lambda record, rows: handed.append((record, rows)) or 0) as writer:
            writer.add(contents, features_of(contents))
        writers.append(writer)
    segments = [store.root / record.file for record, _rows in handed]
    assert len(segments) == 2 and all(path.is_file() for path in segments)
    assert store.lookup(KEY, first + second) == {}
    assert store.info().reclaimable == []
    store.verify(repair=True)
    assert all(path.is_file() for path in segments)

    store.index.commit_segment(*handed[0])  # rank 0 indexes the first one, then the ranks release
    for writer in writers:
        writer.release_handed_over()
    assert sorted(store.lookup(KEY, first + second)) == sorted(first)
    # The second was never indexed (a failed run): released, it is a leftover that repair reclaims.
    leftovers = store.info().reclaimable
    assert segments[1] in leftovers and segments[0] not in leftovers
    store.verify(repair=True)
    assert segments[0].is_file() and not segments[1].exists()
    found = store.lookup(KEY, first)
    assert np.array_equal(store.read([found[c] for c in first], "vv"), features_of(first)["vv"])


def test_two_concurrent_writer_processes_both_succeed(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    contents = [content(i) for i in range(40)]
    first, second = writer_process(root, 40, 0.01), writer_process(root, 40, 0.01)
    outputs = [process.communicate(timeout=300) for process in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    new = [int(out.split()[-1]) for out, _ in outputs]
    # Every image is indexed exactly once, whoever sealed it first.
    assert sum(new) == 40
    store = FeatureStore(root)
    report = store.verify()
    assert report.ok, report.problems
    assert report.rows_checked == 40 and report.reclaimable == []
    assert_complete_and_correct(store, contents)


def test_writer_killed_at_random_moments_leaves_a_store_that_verifies(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    count = 60
    contents = [content(i) for i in range(count)]
    rng = random.Random(12)
    indexed = 0
    for attempt in range(5):
        process = writer_process(root, count, 0.02)
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "start"
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        store = FeatureStore(root)
        report = store.verify()
        assert report.ok, (attempt, report.problems)
        now = len(store.lookup(KEY, contents))
        assert now >= indexed
        indexed = now
        store.close()
    # The rerun writes only what is missing, and the store ends complete and correct.
    process = writer_process(root, count, 0.0)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    missing, new = (int(x) for x in out.split()[-2:])
    assert missing == count - indexed and new == missing
    store = FeatureStore(root)
    assert_complete_and_correct(store, contents)
    assert store.verify(repair=True).ok
    assert store.verify().reclaimable == []
