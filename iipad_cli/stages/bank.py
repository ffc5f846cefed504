"""`iipad bank`: the category-aware banks of eqs. 13–14 from the K-shot features and the generator.

For every training (shot) image: its normalised Q-Former tokens (the retrieval key), its own
normalised prompt embeddings [e^n, e^a] (generator in eval mode + frozen text encoder), and its
normalised original-path patch tokens at each memory layer. Class names are stored for reporting
only; retrieval never reads them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from iipad_cli.artifacts import BANKS_FILE, FEATURES_FILE, GENERATOR_FILE, provenance, record_stage, sha256_file
from iipad_cli.devices import resolve_device
from iipad_cli.errors import IipadError
from iipad_cli.models.anomaly import instance_prompts, normalise
from iipad_cli.pipeline.bank import BankOptions
from iipad_cli.runlock import run_lock
from iipad_cli.schema.banks import Banks, save_banks
from iipad_cli.schema.features import features_precision, read_split
from iipad_cli.stages._scoring import check_finite_features, features_to_device, load_run_models
from iipad_cli.ui import log


def build_banks(run_dir: Path, options: BankOptions) -> Path:
    """Write RUN/banks.safetensors (run directory locked, checked writable first); returns its path."""
    with run_lock(run_dir, "bank", create=False):
        return _build_banks(Path(run_dir), options)


def _build_banks(run_dir: Path, options: BankOptions) -> Path:
    started = time.perf_counter()
    options.validate()
    torch.manual_seed(options.seed)
    run_dir = Path(run_dir)
    device = resolve_device(options.device)
    models = load_run_models(run_dir, weights=options.weights, device=device, force=options.force)
    features_path = run_dir / FEATURES_FILE
    train = read_split(features_path, "train")
    paths = [str(p) for p in train["path"]]
    if not paths:
        raise IipadError(f"{features_path}: the train split is empty; nothing to put in the banks")
    variant = models.preset.cls_token_variant
    queries, prompts, mems = [], [], []
    for start in range(0, len(paths), options.batch_size):
        stop = min(start + options.batch_size, len(paths))
        arrays = {name: np.asarray(train[name][start:stop]) for name in ("cls_token", "qformer", "vv", "mem")}
        features = features_to_device(arrays, device)
        check_finite_features(features, paths[start:stop], f"{features_path} (train)", run_dir)
        with torch.inference_mode():
            prompts.append(
                instance_prompts(
                    models.generator, models.backbone.text_encoder, features["qformer"], features["cls_token"][:, variant]
                ).cpu()
            )
            queries.append(normalise(features["qformer"]).cpu())
            mems.append(normalise(features["mem"]).cpu())
    banks = Banks(
        query=torch.cat(queries),
        prompt=torch.cat(prompts),
        mem=torch.cat(mems).transpose(0, 1).contiguous(),
        memory_layers=tuple(int(layer) for layer in models.features_attrs["memory_layers"]),
        paths=paths,
        classes=[str(c) for c in train["cls"]],
        metadata={},
    )
    if not all(bool(torch.isfinite(t).all()) for t in (banks.prompt, banks.query, banks.mem)):
        raise IipadError(f"{run_dir / GENERATOR_FILE}: produced NaN or Inf bank prompts; retrain the generator")
    out = run_dir / BANKS_FILE
    attrs = models.features_attrs
    save_banks(
        out,
        banks,
        provenance(
            backbone_id=str(attrs["backbone_id"]),
            precision=features_precision(attrs),
            weights=attrs.get("weights", {}),
            random_weights=bool(attrs.get("random_weights", False)),
            preset=models.preset.to_json(),
            cls_token_variant=variant,
            shots=int(attrs["shots"]),
            seed=int(attrs.get("seed", 0)),
            data_root=str(attrs.get("data_root", "")),
            features_sha256=models.features_sha,
            generator_sha256=models.generator_sha,
        ),
    )
    seconds = time.perf_counter() - started
    rate = len(paths) / seconds if seconds > 0 else 0.0
    log(f"banked {len(paths)} images in {seconds:.1f} s ({rate:.2f} images/s) -> {out}", options.quiet)
    record_stage(
        run_dir,
        "bank",
        options=options.recorded(),
        inputs={FEATURES_FILE: models.features_sha, GENERATOR_FILE: models.generator_sha},
        outputs={BANKS_FILE: sha256_file(out)},
        seconds=seconds,
        extra={"images": len(paths), "images_per_s": round(rate, 3)},
    )
    return out
