"""`iipad train`: fit the prompt generator on the cached K-shot features.

Reads `RUN/features.h5:train` only (never the image encoders), loads the backbone just for its
frozen text tower, and writes `RUN/generator.safetensors`, `RUN/train_log.csv` and the manual
prompt cache. One image per step in a class-shuffled order by default (the released code's loop);
`batch_size` groups consecutive images of that order into one step.
"""

from __future__ import annotations

import csv
import io
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iipad_cli.artifacts import (
    FEATURES_FILE,
    GENERATOR_FILE,
    MANUAL_PROMPTS_FILE,
    TRAIN_LOG_FILE,
    atomic_path,
    record_stage,
    sha256_file,
)
from iipad_cli.config import Preset
from iipad_cli.devices import resolve_device
from iipad_cli.errors import IipadError
from iipad_cli.hints import extract_command
from iipad_cli.losses import normalise, prompt_losses
from iipad_cli.models.prompt_generator import GeneratorConfig, PromptGenerator
from iipad_cli.checkpoints import load_backbone
from iipad_cli.models.registry import get_spec
from iipad_cli.pipeline.train import SCHEDULES, TrainOptions, effective_preset, recorded_options
from iipad_cli.prompts import manual_prompt_embeddings, select_prompts
from iipad_cli.runlock import run_lock
from iipad_cli.schema.features import check_backbone_weights, features_precision, load_features_attrs, read_split
from iipad_cli.schema.generator import read_generator_metadata, save_generator
from iipad_cli.ui import log, progress

LOG_COLUMNS = ("epoch", "step", "images", "total", "semantic", "token", "text", "lr")


@dataclass(frozen=True)
class TrainResult:
    generator_path: Path
    log_path: Path
    steps: int
    seconds: float
    first_epoch_loss: float
    final_losses: dict[str, float]


@dataclass(frozen=True)
class TrainFeatures:
    """The training split as float32 tensors on the compute device."""

    paths: list[str]
    classes: list[str]
    cls_token: Tensor  # (N, 2, D)
    qformer: Tensor  # (N, M, d)
    vv: Tensor  # (N, L, P, D)


def make_scheduler(optimizer: torch.optim.Optimizer, preset: Preset) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch. `official-cosine` is the released code's CosineAnnealingLR(T_max =
    epochs, eta_min): with eta_min above the base LR the rate *rises* along an inverted cosine."""
    if preset.schedule == "official-cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=preset.epochs, eta_min=preset.eta_min)
    if preset.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)
    raise IipadError(f"unknown schedule {preset.schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def epoch_order(classes: list[str], rng: random.Random) -> list[int]:
    """Row indices for one epoch: the classes in a shuffled order, each class's shots in file order."""
    names = sorted(set(classes))
    rng.shuffle(names)
    return [row for name in names for row, cls in enumerate(classes) if cls == name]


def read_train_features(path: Path, variant: int, device: torch.device) -> TrainFeatures:
    data = read_split(path, "train", ("path", "cls", "cls_token", "qformer", "vv"))
    paths = list(data["path"])
    if not paths:
        raise IipadError(f"{path}: the train split is empty")
    tensors = {name: torch.from_numpy(data[name]).float() for name in ("cls_token", "qformer", "vv")}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise IipadError(
                f"{path}: train/{name} holds NaN or Inf values; rebuild the features with {extract_command(path.parent, force=True)}"
            )
    if not 0 <= variant < tensors["cls_token"].shape[1]:
        raise IipadError(f"{path}: train/cls_token has no variant {variant}")
    return TrainFeatures(
        paths=paths,
        classes=list(data["cls"]),
        cls_token=tensors["cls_token"].to(device),
        qformer=tensors["qformer"].to(device),
        vv=tensors["vv"].to(device),
    )


def _refuse_stale_generator(run_dir: Path, features_sha: str, backbone_id: str, force: bool) -> None:
    """An existing generator made from another features file or backbone is not silently replaced."""
    path = run_dir / GENERATOR_FILE
    if force or not path.is_file():
        return
    meta = read_generator_metadata(path)
    if meta.get("backbone_id") != backbone_id:
        raise IipadError(
            f"{path}: trained for backbone {meta.get('backbone_id')!r}, but the features are {backbone_id!r}; "
            "pass --force to replace it"
        )
    if meta.get("features_sha256") != features_sha:
        raise IipadError(
            f"{path}: trained on a different {FEATURES_FILE} (it changed since); pass --force to retrain and replace it"
        )


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def train(run_dir: Path, options: TrainOptions) -> TrainResult:
    """Train the generator of `run_dir` and write its artifacts (see module docstring).

    The run directory is locked, and checked writable, before any work."""
    with run_lock(run_dir, "train", create=False):
        return _train(Path(run_dir), options)


def _train(run_dir: Path, options: TrainOptions) -> TrainResult:
    started = time.perf_counter()
    run_dir = Path(run_dir)
    features_path = run_dir / FEATURES_FILE
    attrs = load_features_attrs(features_path)
    options.validate()
    preset = effective_preset(options)
    backbone_id = str(attrs["backbone_id"])
    features_sha = sha256_file(features_path)
    _refuse_stale_generator(run_dir, features_sha, backbone_id, options.force)

    device = resolve_device(options.device)
    backbone = load_backbone(get_spec(backbone_id), options.weights, device)
    check_backbone_weights(features_path, dict(attrs.get("weights", {})), backbone.weights, backbone_id)
    text_encoder = backbone.text_encoder.eval()

    prompts = select_prompts(preset.prompt_templates, attrs.get("layout"), options.prompts)
    manual_normal, manual_abnormal = (
        t.to(device) for t in manual_prompt_embeddings(backbone, prompts, run_dir / MANUAL_PROMPTS_FILE)
    )
    data = read_train_features(features_path, preset.cls_token_variant, device)

    torch.manual_seed(options.seed)
    config = GeneratorConfig.from_preset(preset, width=data.qformer.shape[-1], query_tokens=data.qformer.shape[1])
    generator = PromptGenerator(config).to(device).train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=preset.lr, weight_decay=preset.weight_decay)
    scheduler = make_scheduler(optimizer, preset)
    order_rng = random.Random(options.seed)
    noise_rng = torch.Generator().manual_seed(options.seed)

    rows: list[dict[str, Any]] = []
    epoch_totals: list[float] = []
    steps_per_epoch = -(-len(data.paths) // options.batch_size)
    total_steps = steps_per_epoch * preset.epochs
    step = 0
    last_epoch: list[dict[str, float]] = []
    loop_start = time.perf_counter()
    with progress(options.quiet) as bar:
        task = bar.add_task("train", total=total_steps, rate="")
        for epoch in range(preset.epochs):
            order = epoch_order(data.classes, order_rng)
            lr = optimizer.param_groups[0]["lr"]
            last_epoch = []
            for start in range(0, len(order), options.batch_size):
                batch = order[start : start + options.batch_size]
                index = torch.tensor(batch, device=device)
                vv = data.vv[index]
                noise = torch.randn(vv.shape, generator=noise_rng).to(device)
                s_normal, s_abnormal = generator(data.qformer[index], normalise(data.cls_token[index, preset.cls_token_variant]))
                e_normal, normal_tokens = text_encoder(s_normal)
                e_abnormal, abnormal_tokens = text_encoder(s_abnormal)
                terms = prompt_losses(
                    features=vv,
                    noise=noise,
                    e_normal=normalise(e_normal),
                    e_abnormal=normalise(e_abnormal),
                    normal_tokens=normalise(normal_tokens),
                    abnormal_tokens=normalise(abnormal_tokens),
                    manual_normal=manual_normal,
                    manual_abnormal=manual_abnormal,
                    preset=preset,
                )
                images = [data.paths[row] for row in batch]
                if not torch.isfinite(terms.total):
                    raise IipadError(
                        f"{features_path}: non-finite loss at epoch {epoch} step {step} ({', '.join(images)}); "
                        f"training stopped, {GENERATOR_FILE} left unchanged (try a lower --lr)"
                    )
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                optimizer.step()
                values = terms.as_floats()
                last_epoch.append(values)
                rows.append({"epoch": epoch, "step": step, "images": ";".join(images), **values, "lr": lr})
                step += 1
                bar.update(
                    task,
                    advance=1,
                    rate=f"loss {values['total']:.4f} (s {values['semantic']:.3f} f {values['token']:.3f} t {values['text']:.3f})",
                )
            epoch_totals.append(sum(v["total"] for v in last_epoch) / len(last_epoch))
            scheduler.step()
    loop_seconds = time.perf_counter() - loop_start
    steps_per_second = step / loop_seconds if loop_seconds > 0 else float("inf")
    final_losses = {name: sum(v[name] for v in last_epoch) / len(last_epoch) for name in last_epoch[0]}

    recorded = recorded_options(options, preset)
    training = {
        **recorded,
        "steps": step,
        "images": len(data.paths),
        "text_context": "truncated",
        "first_epoch_loss": epoch_totals[0],
    }
    generator_path = run_dir / GENERATOR_FILE
    log_path = run_dir / TRAIN_LOG_FILE
    save_generator(
        generator_path,
        generator,
        {
            "preset": preset.to_json(),
            "training": training,
            "features_sha256": features_sha,
            "backbone_id": backbone_id,
            "precision": features_precision(attrs),
            "random_weights": backbone.random_weights,
            "final_losses": final_losses,
            "manual_prompts": prompts.summary(),
        },
    )
    _write_log(log_path, rows)
    seconds = time.perf_counter() - started
    log(f"train: {step} steps in {loop_seconds:.1f} s ({steps_per_second:.2f} steps/s), final loss {final_losses['total']:.4f}", options.quiet)
    record_stage(
        run_dir,
        "train",
        options={**recorded, "device": str(device), "force": options.force},
        inputs={FEATURES_FILE: features_sha},
        outputs={GENERATOR_FILE: sha256_file(generator_path), TRAIN_LOG_FILE: sha256_file(log_path)},
        seconds=seconds,
        extra={
            "steps": step,
            "steps_per_second": round(steps_per_second, 3),
            "first_epoch_loss": epoch_totals[0],
            "final_losses": final_losses,
            "manual_prompts": prompts.summary(),
        },
    )
    return TrainResult(
        generator_path=generator_path,
        log_path=log_path,
        steps=step,
        seconds=seconds,
        first_epoch_loss=epoch_totals[0],
        final_losses=final_losses,
    )
