"""`iipad weights check|convert|fetch` and the missing-weights path, offline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from iipad_cli.cli import app
from iipad_cli.checkpoints import export_weights, load_backbone
from iipad_cli.models.registry import build_random_backbone, get_spec

runner = CliRunner()


@pytest.fixture(autouse=True)
def _offline_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No weights anywhere, an empty Hugging Face cache, and the hub client in offline mode."""
    monkeypatch.delenv("IIPAD_WEIGHTS", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once at import, and open_clip imported it already.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _assert_clean_failure(result) -> str:
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_real_weights_offline_fails_cleanly() -> None:
    line = _assert_clean_failure(runner.invoke(app, ["weights", "check"]))
    assert "vit-l-14" in line and "not found" in line
    assert "open_clip_model.safetensors" in line and "qformer/pytorch_model.bin" in line
    assert "--weights DIR" in line and "iipad weights fetch" in line
    assert "--backbone tiny" in line and "iipad demo" in line  # how to try the tool without weights


def test_missing_weights_in_extract_mention_the_tiny_backbone(tmp_path: Path, shared_data: Path) -> None:
    result = runner.invoke(
        app, ["extract", str(shared_data / "mvtec"), "--shots", "1", "--backbone", "vit-l-14", "-o", str(tmp_path / "run"), "--quiet"]
    )
    line = _assert_clean_failure(result)
    assert "not found" in line and "--backbone tiny" in line


def test_empty_weights_directory_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _assert_clean_failure(runner.invoke(app, ["weights", "check", "--weights", str(empty)]))
    assert str(empty) in line


def test_check_lists_files_hashes_and_trunk_sharing(tmp_path: Path) -> None:
    paths = export_weights(build_random_backbone(get_spec("tiny")), tmp_path / "w", qformer_format="bin")
    result = runner.invoke(app, ["weights", "check", "--backbone", "tiny", "--weights", str(tmp_path / "w"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["trunk_shared"] is True and report["random_weights"] is False
    files = {item["role"]: item for item in report["files"]}
    for role, path in (("clip", paths.clip), ("qformer", paths.qformer)):
        assert files[role]["path"] == str(path)
        assert files[role]["size"] == path.stat().st_size
        assert files[role]["sha256"] == _sha256(path)

    table = runner.invoke(app, ["weights", "check", "--backbone", "tiny", "--weights", str(tmp_path / "w")])
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0] == "role\tpath\tbytes\tsha256"
    assert f"qformer\t{paths.qformer}\t{paths.qformer.stat().st_size}\t{_sha256(paths.qformer)}" in table.stdout
    assert "trunk sharing applies" in table.stderr


def test_check_tiny_without_weights_reports_random_weights() -> None:
    result = runner.invoke(app, ["weights", "check", "--backbone", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == {"backbone": "tiny", "random_weights": True, "trunk_shared": True, "files": []}


def test_check_reports_untied_trunk(tmp_path: Path) -> None:
    export_weights(build_random_backbone(get_spec("tiny"), tie_trunk=False), tmp_path / "w")
    result = runner.invoke(app, ["weights", "check", "--backbone", "tiny", "--weights", str(tmp_path / "w")])
    assert result.exit_code == 0
    assert "trunk sharing does not apply" in result.stderr


def test_convert_round_trip_keeps_only_used_keys(tmp_path: Path) -> None:
    backbone = build_random_backbone(get_spec("tiny"), seed=7)
    paths = export_weights(backbone, tmp_path / "w", qformer_format="bin")
    state = torch.load(paths.qformer, weights_only=True)
    state["unused_head.weight"] = torch.ones(4, 4)
    torch.save(state, paths.qformer)

    result = runner.invoke(app, ["weights", "convert", str(paths.qformer), "--backbone", "tiny"])
    assert result.exit_code == 0, result.output
    output = tmp_path / "w" / "qformer.safetensors"
    assert result.stdout.strip() == str(output)
    with safe_open(str(output), framework="pt") as handle:
        keys = set(handle.keys())
        assert keys == set(state) - {"unused_head.weight"}
        for key in keys:
            assert torch.equal(handle.get_tensor(key), state[key])
        assert handle.metadata()["source_sha256"] == _sha256(paths.qformer)

    # The loader now prefers the converted file and gives the same Q-Former tokens.
    loaded = load_backbone(get_spec("tiny"), weights_dir=tmp_path / "w")
    assert str(output) in loaded.weights
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.qformer(images), backbone.qformer(images))

    again = runner.invoke(app, ["weights", "convert", str(paths.qformer), "--backbone", "tiny"])
    assert "already exists" in _assert_clean_failure(again)
    forced = runner.invoke(app, ["weights", "convert", str(paths.qformer), "--backbone", "tiny", "--force"])
    assert forced.exit_code == 0


def test_convert_refuses_incomplete_checkpoint_without_writing(tmp_path: Path) -> None:
    paths = export_weights(build_random_backbone(get_spec("tiny")), tmp_path / "w", qformer_format="bin")
    state = torch.load(paths.qformer, weights_only=True)
    del state["proj_layer.dense1.weight"]
    torch.save(state, paths.qformer)
    output = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["weights", "convert", str(paths.qformer), "-o", str(output), "--backbone", "tiny"])
    line = _assert_clean_failure(result)
    assert "proj_layer.dense1.weight" in line and str(paths.qformer) in line
    assert not output.exists() and not output.with_name(output.name + ".tmp").exists()


def test_fetch_offline_fails_cleanly(tmp_path: Path) -> None:
    result = runner.invoke(app, ["weights", "fetch", "--weights", str(tmp_path / "w")])
    line = _assert_clean_failure(result)
    assert "cannot download" in line and "timm/vit_large_patch14_clip_224.openai" in line
    assert "networked machine" in line
