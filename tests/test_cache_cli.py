"""`iipad cache info|verify|clear` and the store's one-line errors as the extract command shows them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iipad_cli.cli import app
from iipad_cli.store import resolve_cache_dir

runner = CliRunner()


def _extract(data: Path, out: Path, *extra: str):
    args = ["extract", str(data), "-k", "1", "--backbone", "tiny", "--workers", "0", "-q", "-o", str(out), *extra]
    return runner.invoke(app, args)


@pytest.fixture()
def store(shared_data: Path, tmp_path: Path) -> Path:
    """A store holding one tiny extraction of the VisA tile_b fixtures, at an explicit --cache."""
    cache = tmp_path / "store"
    result = _extract(shared_data / "visa", tmp_path / "run", "--classes", "tile_b", "--cache", str(cache))
    assert result.exit_code == 0, result.output
    return cache


def test_info_lists_keys_images_and_bytes(store: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["cache", "info", "--cache", str(store)])
    assert result.exit_code == 0
    header, row = result.stdout.strip().splitlines()
    assert header.split("\t") == ["key", "backbone", "precision", "images", "segments", "bytes"]
    key, backbone, precision, images, segments, size = row.split("\t")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["extract"]
    assert (backbone, precision, int(images)) == ("tiny", "fp32", manifest["images_encoded"])
    assert key == manifest["store_backbone_key"]
    assert int(size) == sum(p.stat().st_size for p in (store / "segments").rglob("*.h5"))
    as_json = json.loads(runner.invoke(app, ["cache", "info", "--cache", str(store), "--json"]).stdout)
    assert as_json["backbones"][0]["images"] == int(images) and as_json["exists"] is True


def test_cache_option_environment_and_default(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIPAD_CACHE", str(store))
    assert resolve_cache_dir() == store.resolve()
    assert runner.invoke(app, ["cache", "info"]).stdout.count("\ttiny\t") == 1
    empty = runner.invoke(app, ["cache", "info", "--cache", str(tmp_path / "nothing")])
    assert empty.exit_code == 0 and empty.stdout == "" and "no feature store yet" in empty.stderr


def test_verify_damage_repair_and_reencode(store: Path, shared_data: Path, tmp_path: Path) -> None:
    assert runner.invoke(app, ["cache", "verify", "--cache", str(store)]).exit_code == 0
    segment = next((store / "segments").rglob("*.h5"))
    segment.chmod(0o644)
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x01
    segment.write_bytes(bytes(data))
    # A later extract refuses the damaged segment in one line with the way out, writing nothing.
    refused = _extract(shared_data / "visa", tmp_path / "again", "--classes", "tile_b", "--cache", str(store))
    lines = refused.stderr.strip().splitlines()
    assert refused.exit_code == 1 and len(lines) == 1
    assert str(segment) in lines[0] and "iipad cache verify --repair" in lines[0]
    assert not (tmp_path / "again" / "features.h5").exists()
    checked = runner.invoke(app, ["cache", "verify", "--cache", str(store)])
    assert checked.exit_code == 1 and checked.stdout.strip().startswith(f"{segment}: damaged")
    repaired = runner.invoke(app, ["cache", "verify", "--cache", str(store), "--repair"])
    assert repaired.exit_code == 0 and not segment.exists()
    assert runner.invoke(app, ["cache", "verify", "--cache", str(store)]).exit_code == 0
    again = _extract(shared_data / "visa", tmp_path / "again", "--classes", "tile_b", "--cache", str(store))
    assert again.exit_code == 0, again.output
    entry = json.loads((tmp_path / "again" / "manifest.json").read_text())["stages"]["extract"]
    assert entry["images_from_store"] == 0 and entry["images_encoded"] > 0


def test_other_schema_version_is_one_line_with_the_way_out(store: Path, shared_data: Path, tmp_path: Path) -> None:
    connection = sqlite3.connect(store / "index.sqlite")
    connection.execute("UPDATE meta SET value='0' WHERE name='store_schema_version'")
    connection.commit()
    connection.close()
    refused = _extract(shared_data / "visa", tmp_path / "other", "--classes", "tile_b", "--cache", str(store))
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "schema version 0" in refused.stderr and f"iipad cache clear --all --cache {store.resolve()}" in refused.stderr
    info = runner.invoke(app, ["cache", "info", "--cache", str(store)])
    assert info.exit_code == 1 and "schema version 0" in info.stderr
    assert runner.invoke(app, ["cache", "clear", "--all", "--cache", str(store)]).exit_code == 0
    assert _extract(shared_data / "visa", tmp_path / "other", "--classes", "tile_b", "--cache", str(store)).exit_code == 0


def test_clear_one_key_or_all(store: Path) -> None:
    usage = runner.invoke(app, ["cache", "clear", "--cache", str(store)])
    assert usage.exit_code == 2
    assert runner.invoke(app, ["cache", "clear", "--key", "zzzz", "--cache", str(store)]).exit_code == 1
    key = runner.invoke(app, ["cache", "info", "--cache", str(store)]).stdout.splitlines()[1].split("\t")[0]
    cleared = runner.invoke(app, ["cache", "clear", "--key", key[:8], "--cache", str(store)])
    assert cleared.exit_code == 0 and "removed 1 backbone keys" in cleared.stderr
    assert runner.invoke(app, ["cache", "info", "--cache", str(store)]).stdout.strip() == "key\tbackbone\tprecision\timages\tsegments\tbytes"
    assert runner.invoke(app, ["cache", "clear", "--all", "--cache", str(store)]).exit_code == 0
    assert not (store / "index.sqlite").exists() and not (store / "segments").exists()
