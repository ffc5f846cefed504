"""Atomic writes and the manifest: a failed write never replaces a complete artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iipad_cli.artifacts import atomic_path, read_manifest, record_stage, sha256_json, write_json_atomic


def test_atomic_path_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "artifact.bin"
    target.write_bytes(b"complete")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"complete"
    assert not (tmp_path / "artifact.bin.tmp").exists()
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_manifest_keeps_latest_entry_per_stage_and_history(tmp_path: Path) -> None:
    record_stage(tmp_path, "train", options={"epochs": 2}, inputs={"features.h5": "a"}, outputs={"g": "b"}, seconds=1.0)
    record_stage(tmp_path, "train", options={"epochs": 3}, inputs={"features.h5": "a"}, outputs={"g": "c"}, seconds=2.0)
    manifest = read_manifest(tmp_path)
    assert manifest["stages"]["train"]["options"] == {"epochs": 3}
    assert manifest["stages"]["train"]["options_hash"] == sha256_json({"epochs": 3})
    assert [entry["stage"] for entry in manifest["history"]] == ["train", "train"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


def test_sha256_json_ignores_key_order() -> None:
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})


def test_write_json_atomic_roundtrip(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "x.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"k": [1, 2]}
