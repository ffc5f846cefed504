"""What `bank`, `score` and `predict` share: loading a run's models with their compatibility checks,
and scoring one batch of feature tensors.

`score` (cached test features) and `predict` (features extracted on the fly) call the same
`score_features`, so a test image gives the same map and score through either path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iipad_cli.artifacts import BANKS_FILE, FEATURES_FILE, GENERATOR_FILE, require_file, sha256_file
from iipad_cli.config import Preset
from iipad_cli.errors import IipadError
from iipad_cli.hints import extract_command, stage_command
from iipad_cli.models.anomaly import AnomalyOutput, anomaly_scores, instance_prompts
from iipad_cli.models.backbone import Backbone
from iipad_cli.models.prompt_generator import PromptGenerator
from iipad_cli.checkpoints import load_backbone
from iipad_cli.models.registry import get_spec
from iipad_cli.schema.banks import Banks, load_banks, read_banks_metadata
from iipad_cli.schema.features import FEATURE_FIELDS, check_backbone_weights, features_precision, load_features_attrs, open_features
from iipad_cli.schema.generator import load_generator
from iipad_cli.stages.encoding import fp16_features


@dataclass
class RunModels:
    """A run's trained generator, frozen backbone and (once built) banks, on one device."""

    run_dir: Path
    features_attrs: dict[str, Any]
    features_sha: str
    generator: PromptGenerator
    generator_sha: str
    preset: Preset
    backbone: Backbone
    device: torch.device
    banks: Banks | None = None
    banks_sha: str = ""


def preset_from_metadata(meta: dict[str, Any], path: Path) -> Preset:
    """The effective preset the generator was trained with (stored as JSON by `train`)."""
    try:
        return Preset(**meta["preset"])
    except (KeyError, TypeError) as error:
        raise IipadError(f"{path}: no usable preset in metadata ({error})") from None


def _refuse(condition: bool, message: str, force: bool) -> None:
    if condition and not force:
        raise IipadError(message + "; pass --force to use it anyway")


def load_run_models(
    run_dir: Path,
    *,
    weights: Path | None,
    device: torch.device,
    force: bool,
    hash_features: bool = True,
    precision: str | None = None,
) -> RunModels:
    """Features attributes, the generator (eval mode) and the backbone of a run, checked together.

    Refuses a generator trained for another backbone or on another features file. `predict` skips
    hashing the (large) features file and relies on the generator/banks hashes instead. The image
    encoders run in the precision the run's features were computed in; another `precision`
    ("fp32"/"bf16", resolved) is refused unless `force`, so fp32 and bf16 features never mix.
    """
    run_dir = Path(run_dir)
    features_path = run_dir / FEATURES_FILE
    attrs = load_features_attrs(features_path)
    generator_path = require_file(run_dir / GENERATOR_FILE, "train")
    generator, meta = load_generator(generator_path, str(device))
    backbone_id = str(attrs["backbone_id"])
    _refuse(
        meta.get("backbone_id") != backbone_id,
        f"{generator_path}: trained for backbone {meta.get('backbone_id')!r}, but {features_path} is {backbone_id!r}",
        force,
    )
    features_sha = sha256_file(features_path) if hash_features else str(meta.get("features_sha256", ""))
    _refuse(
        meta.get("features_sha256") != features_sha,
        f"{generator_path}: trained on another {FEATURES_FILE} (it changed or comes from another run)",
        force,
    )
    run_precision = features_precision(attrs)
    wanted = run_precision if precision is None else precision
    _refuse(
        wanted != run_precision,
        f"{features_path}: features computed in {run_precision}, not {wanted} (fp32 and bf16 features must not mix)",
        force,
    )
    backbone = load_backbone(get_spec(backbone_id), weights, device, wanted)
    check_backbone_weights(features_path, dict(attrs.get("weights", {})), backbone.weights, backbone_id)
    backbone.text_encoder.eval()
    return RunModels(
        run_dir=run_dir,
        features_attrs=attrs,
        features_sha=features_sha,
        generator=generator.eval(),
        generator_sha=sha256_file(generator_path),
        preset=preset_from_metadata(meta, generator_path),
        backbone=backbone,
        device=device,
    )


def attach_banks(models: RunModels, force: bool) -> RunModels:
    """Load the run's banks, refusing banks built from another generator, features file or backbone."""
    path = require_file(models.run_dir / BANKS_FILE, "bank")
    meta = read_banks_metadata(path)
    backbone_id = str(models.features_attrs["backbone_id"])
    _refuse(meta.get("backbone_id") != backbone_id, f"{path}: built for backbone {meta.get('backbone_id')!r}, not {backbone_id!r}", force)
    _refuse(
        meta.get("generator_sha256") != models.generator_sha,
        f"{path}: built with another {GENERATOR_FILE} (retrained, or from another run); re-run {stage_command('bank', models.run_dir)}",
        force,
    )
    _refuse(
        meta.get("features_sha256") != models.features_sha,
        f"{path}: built from another {FEATURES_FILE}; re-run {stage_command('bank', models.run_dir)}",
        force,
    )
    banks = load_banks(path).to(models.device)
    return dataclasses.replace(models, banks=banks, banks_sha=sha256_file(path))


def features_to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, Tensor]:
    """Stored fp16 feature arrays -> float32 tensors on the device."""
    return {name: torch.from_numpy(np.ascontiguousarray(arrays[name])).to(device).float() for name in FEATURE_FIELDS}


def encode_for_scoring(models: RunModels, images: Sequence[Tensor]) -> dict[str, Tensor]:
    """Preprocessed images (3, S, S) -> feature tensors as `score` sees them: encoded by the run's
    frozen backbone, then rounded to the fp16 that features.h5 stores (the run's test images were
    scored from those), as float32 on the device."""
    return {name: values.float() for name, values in fp16_features(models.backbone, torch.stack(list(images))).items()}


def check_finite_features(features: dict[str, Tensor], names: Sequence[str], where: str, run_dir: Path | None = None) -> None:
    """NaN/Inf in any feature of an image is a one-line error naming the image (and, for a run's
    stored features, the command that rebuilds them)."""
    for field in FEATURE_FIELDS:
        bad = ~torch.isfinite(features[field]).flatten(1).all(dim=1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            fix = f"; rebuild the features with {extract_command(run_dir, force=True)}" if run_dir is not None else ""
            raise IipadError(f"{where}: image {names[first]}: {field} features hold NaN or Inf{fix}")


def _check_finite_output(output: AnomalyOutput, names: Sequence[str]) -> None:
    finite = torch.isfinite(output.maps).flatten(1).all(dim=1) & torch.isfinite(output.image_score)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise IipadError(f"image {names[first]}: anomaly map or score is NaN or Inf (check the generator and banks)")


def score_features(
    models: RunModels,
    features: dict[str, Tensor],
    names: Sequence[str],
    *,
    top_k: int,
    resolution: int,
    sigma: float,
) -> AnomalyOutput:
    """Maps, image scores and components for one batch of float32 feature tensors on the device.

    The test images' own prompts come from the generator (eval mode) and the frozen text encoder;
    the rest is `models.anomaly.anomaly_scores` against the run's banks.
    """
    assert models.banks is not None
    banks = models.banks
    variant = models.preset.cls_token_variant
    with torch.inference_mode():
        cls_token = features["cls_token"][:, variant]
        prompts = instance_prompts(models.generator, models.backbone.text_encoder, features["qformer"], cls_token)
        output = anomaly_scores(
            query=features["qformer"],
            cls_token=cls_token,
            vv=features["vv"],
            mem=features["mem"],
            test_prompts=prompts,
            bank_query=banks.query,
            bank_prompts=banks.prompt,
            bank_mem=banks.mem,
            top_k=top_k,
            temperature=models.preset.temperature,
            formula=models.preset.image_score,
            resolution=resolution,
            sigma=sigma,
        )
    _check_finite_output(output, names)
    return output


def check_top_k(top_k: int, bank_size: int) -> None:
    if not 1 <= top_k <= bank_size:
        raise IipadError(f"--top-k {top_k}: must be between 1 and the bank size {bank_size}")


def iter_feature_rows(path: Path, split: str, batch_size: int) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """(start, stop, fp16 feature arrays) per batch of a features split, read slice by slice so the
    test set never has to fit in memory at once."""
    with open_features(path) as handle:
        group = handle[split]
        count = int(group.attrs["rows_written"])
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            yield start, stop, {name: group[name][start:stop] for name in FEATURE_FIELDS}
