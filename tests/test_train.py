"""`iipad train` end to end on `tiny` features of the real bottle fixture (random weights), plus the
schedule, the class-shuffled order, gradients, determinism, and the refusal / NaN paths."""

from __future__ import annotations

import csv
import math
import random
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from typer.testing import CliRunner

from iipad_cli.artifacts import GENERATOR_FILE, TRAIN_LOG_FILE, read_manifest
from iipad_cli.cli import app
from iipad_cli.config import get_preset
from iipad_cli.losses import LossTerms, normalise, prompt_losses
from iipad_cli.models.prompt_generator import GeneratorConfig, PromptGenerator
from iipad_cli.schema.generator import load_generator
from iipad_cli.stages import train as train_stage

PROMPTS_YAML = """normal:
  - a photo of a flawless object
  - a photo of a perfect object
anomalous:
  - a photo of a damaged object
  - a photo of the object with a crack
  - a photo of a broken object
"""


@pytest.fixture(autouse=True)
def _one_thread():
    """Training steps on `tiny` are a few milliseconds of arithmetic: with 2 threads on a loaded
    2-core machine, thread synchronisation costs several times the step itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def features_file(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """features.h5 of 2 bottle shots (+ test images) extracted with `tiny` (random weights)."""
    run = tmp_path_factory.mktemp("extract")
    args = ["extract", str(shared_data / "mvtec"), "--shots", "2", "--backbone", "tiny", "-o", str(run)]
    result = CliRunner().invoke(app, [*args, "--classes", "bottle", "--workers", "0", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    return run / "features.h5"


@pytest.fixture()
def run_dir(features_file: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(features_file, run / "features.h5")
    (tmp_path / "prompts.yaml").write_text(PROMPTS_YAML)
    return run


def invoke_train(run: Path, *extra: str):
    prompts = run.parent / "prompts.yaml"
    args = ["train", str(run), "--device", "cpu", "--epochs", "2", "--prompts", str(prompts), "-q", *extra]
    return CliRunner().invoke(app, args)


def read_log(run: Path) -> list[dict[str, str]]:
    with (run / TRAIN_LOG_FILE).open() as handle:
        return list(csv.DictReader(handle))


def epoch_means(rows: list[dict[str, str]]) -> list[float]:
    epochs = sorted({int(row["epoch"]) for row in rows})
    return [
        sum(float(r["total"]) for r in rows if int(r["epoch"]) == e) / sum(1 for r in rows if int(r["epoch"]) == e)
        for e in epochs
    ]


def test_train_writes_generator_log_and_manifest(run_dir: Path):
    result = invoke_train(run_dir, "--epochs", "6", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run_dir)
    generator, meta = load_generator(run_dir / GENERATOR_FILE)
    assert meta["backbone_id"] == "tiny" and meta["random_weights"] is True
    assert meta["training"]["epochs"] == 6 and meta["training"]["seed"] == 1
    assert meta["training"]["lr"] == 1e-5 and meta["training"]["schedule"] == "official-cosine"
    assert meta["preset"]["name"] == "official"
    assert meta["manual_prompts"]["normal_count"] == 2 and meta["manual_prompts"]["anomalous_count"] == 3
    assert meta["generator_config"]["query_tokens"] == 16 and meta["generator_config"]["width"] == 32
    assert set(meta["final_losses"]) == {"total", "semantic", "token", "text"}
    rows = read_log(run_dir)
    assert len(rows) == 6 * 2  # C·K = 2 steps per epoch at one image per step
    assert list(rows[0]) == ["epoch", "step", "images", "total", "semantic", "token", "text", "lr"]
    assert all(row["images"].startswith("bottle/train/good/") for row in rows)
    means = epoch_means(rows)
    assert means[-1] < means[0]
    assert read_manifest(run_dir)["stages"]["train"]["options"]["epochs"] == 6
    s_n, s_a = generator(torch.randn(1, 16, 32), torch.randn(1, 32))
    assert s_n.shape == (1, 28, 32)


def test_paper_preset_and_overrides_are_recorded(run_dir: Path):
    args = ["--preset", "paper", "--lr", "0.002", "--weight-decay", "0.01", "--schedule", "official-cosine"]
    result = invoke_train(run_dir, *args, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    _, meta = load_generator(run_dir / GENERATOR_FILE)
    assert meta["training"]["lr"] == 0.002 and meta["training"]["weight_decay"] == 0.01
    assert meta["training"]["batch_size"] == 2
    assert meta["preset"]["schedule"] == "official-cosine" and meta["preset"]["weight_token"] == 8.0
    assert meta["generator_config"]["extra_cls_branch"] is False
    rows = read_log(run_dir)
    assert len(rows) == 2 and all(len(row["images"].split(";")) == 2 for row in rows)


def test_same_seed_gives_identical_generator_file(run_dir: Path, tmp_path: Path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run_dir / "features.h5", other / "features.h5")
    (tmp_path / "prompts.yaml").write_text(PROMPTS_YAML)
    for run in (run_dir, other):
        assert invoke_train(run, "--seed", "5").exit_code == 0
    assert (run_dir / GENERATOR_FILE).read_bytes() == (other / GENERATOR_FILE).read_bytes()
    assert invoke_train(other, "--seed", "6").exit_code == 0
    assert (run_dir / GENERATOR_FILE).read_bytes() != (other / GENERATOR_FILE).read_bytes()


def test_encoder_weights_unchanged_and_never_get_gradients(run_dir: Path, tiny_backbone, monkeypatch):
    before = {k: v.clone() for k, v in tiny_backbone.clip.state_dict().items()}
    monkeypatch.setattr(train_stage, "load_backbone", lambda spec, weights, device: tiny_backbone)
    assert invoke_train(run_dir).exit_code == 0
    after = tiny_backbone.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_backbone.clip.parameters())


def test_only_generator_parameters_receive_gradients(tiny_backbone):
    torch.manual_seed(0)
    generator = PromptGenerator(GeneratorConfig.from_preset(get_preset("official"), width=32, query_tokens=16)).train()
    s_n, s_a = generator(torch.randn(2, 16, 32), normalise(torch.randn(2, 32)))
    e_n, p = tiny_backbone.text_encoder(s_n)
    e_a, n = tiny_backbone.text_encoder(s_a)
    terms = prompt_losses(
        features=torch.randn(2, 4, 256, 32),
        noise=torch.randn(2, 4, 256, 32),
        e_normal=normalise(e_n),
        e_abnormal=normalise(e_a),
        normal_tokens=normalise(p),
        abnormal_tokens=normalise(n),
        manual_normal=torch.randn(3, 32),
        manual_abnormal=torch.randn(4, 32),
        preset=get_preset("official"),
    )
    terms.total.backward()
    assert all(param.grad is not None for param in generator.parameters())
    assert all(param.grad is None for param in tiny_backbone.clip.parameters())
    assert all(param.grad is None for param in tiny_backbone.qformer.parameters())


def test_nan_loss_stops_and_keeps_previous_generator(run_dir: Path, monkeypatch):
    assert invoke_train(run_dir).exit_code == 0
    generator_bytes = (run_dir / GENERATOR_FILE).read_bytes()
    log_bytes = (run_dir / TRAIN_LOG_FILE).read_bytes()
    calls = {"n": 0}
    real = train_stage.prompt_losses

    def poisoned(**kwargs) -> LossTerms:
        terms = real(**kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            return LossTerms(total=terms.total * math.nan, semantic=terms.semantic, token=terms.token, text=terms.text)
        return terms

    monkeypatch.setattr(train_stage, "prompt_losses", poisoned)
    result = invoke_train(run_dir, "--seed", "9")
    assert result.exit_code == 1
    assert "non-finite loss at epoch 1 step 2" in result.output
    assert (run_dir / GENERATOR_FILE).read_bytes() == generator_bytes
    assert (run_dir / TRAIN_LOG_FILE).read_bytes() == log_bytes
    assert not list(run_dir.glob("*.tmp"))


def test_refuses_generator_from_changed_features(run_dir: Path):
    assert invoke_train(run_dir).exit_code == 0
    with h5py.File(run_dir / "features.h5", "a") as handle:
        handle.attrs["edited"] = 1
    result = invoke_train(run_dir)
    assert result.exit_code == 1
    assert "different features.h5" in result.output
    assert invoke_train(run_dir, "--force").exit_code == 0


def test_refuses_features_from_other_weights(run_dir: Path):
    with h5py.File(run_dir / "features.h5", "a") as handle:
        handle.attrs["weights"] = '{"open_clip_model.safetensors": "' + "ab" * 32 + '"}'
    result = invoke_train(run_dir)
    assert result.exit_code == 1
    assert "extracted with other tiny weights" in result.output
    assert not (run_dir / GENERATOR_FILE).exists()


def test_rejects_bad_options(run_dir: Path):
    for args, message in (
        (("--batch-size", "0"), "--batch-size must be at least 1"),
        (("--schedule", "linear"), "--schedule must be one of: official-cosine, constant, not 'linear'"),
        (("--preset", "nope"), "--preset must be official or paper, not 'nope'"),
    ):
        result = invoke_train(run_dir, *args)
        assert result.exit_code == 2 and message in result.output  # bad usage


def test_missing_features_is_one_line_error(tmp_path: Path):
    result = CliRunner().invoke(app, ["train", str(tmp_path), "-q"])
    assert result.exit_code == 1
    assert "features.h5: missing" in result.output


# Reference §4 table: per-epoch LR of CosineAnnealingLR(T_max=20, eta_min=0.05) from base 1e-5.
OFFICIAL_LR_TABLE = {0: 1e-5, 1: 3.2e-4, 2: 1.23e-3, 5: 7.3e-3, 10: 2.50e-2, 15: 4.27e-2, 19: 4.97e-2}


def test_official_schedule_rises_as_in_the_reference_table():
    preset = get_preset("official")
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=preset.lr)
    scheduler = train_stage.make_scheduler(optimizer, preset)
    rates = []
    for _ in range(preset.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for epoch, expected in OFFICIAL_LR_TABLE.items():
        assert rates[epoch] == pytest.approx(expected, rel=0.02)
    for epoch, rate in enumerate(rates):
        closed_form = 0.05 + (1e-5 - 0.05) * (1 + math.cos(math.pi * epoch / 20)) / 2
        assert rate == pytest.approx(closed_form, rel=1e-9)


def test_constant_schedule_keeps_the_rate():
    preset = get_preset("paper")
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=preset.lr)
    scheduler = train_stage.make_scheduler(optimizer, preset)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_epoch_order_shuffles_classes_and_keeps_shots_together():
    classes = ["a", "a", "b", "b", "c", "c"]
    orders = [train_stage.epoch_order(classes, rng) for rng in (random.Random(0), random.Random(0))]
    assert orders[0] == orders[1]
    rng = random.Random(3)
    seen = set()
    for _ in range(10):
        order = train_stage.epoch_order(classes, rng)
        assert sorted(order) == list(range(6))
        assert all(classes[order[i]] == classes[order[i + 1]] for i in (0, 2, 4))
        seen.add(tuple(classes[i] for i in order[::2]))
    assert len(seen) > 1
