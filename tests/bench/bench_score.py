"""Throughput (test images/s) of `score` and `predict`.

1. `score_features` (generator + text encoder + retrieval + maps + smoothing) on random feature
   tensors of ViT-L/14 size (16x768 Q-Former tokens, 4x256x768 V-V tokens, 2x256x1024 memory
   tokens), against a bank of 15 images (MVTec, 1 shot), with a ViT-L/14-size text encoder and
   generator with random weights — the real arithmetic of a full-size score, no real model needed.
   The same for `tiny` sizes.
2. The `score` and `predict` stages end to end on a `tiny` run (random weights) over the real
   fixtures (bottle + tire): rates as the stages report them (model loading excluded).

    python tests/bench/bench_score.py --json out.json [--images 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _report import emit_report, machine_info  # noqa: E402

from iipad_cli.config import BackboneSpec, get_preset  # noqa: E402
from iipad_cli.models.anomaly import normalise  # noqa: E402
from iipad_cli.models.prompt_generator import GeneratorConfig, PromptGenerator  # noqa: E402
from iipad_cli.models.registry import build_clip, get_spec  # noqa: E402
from iipad_cli.models.text import PromptTextEncoder  # noqa: E402
from iipad_cli.pipeline.score import DEFAULT_BATCH  # noqa: E402
from iipad_cli.schema.banks import Banks  # noqa: E402
from iipad_cli.stages._scoring import RunModels, score_features  # noqa: E402

BANK_IMAGES = 15


def _text_encoder(spec: BackboneSpec, device: torch.device) -> nn.Module:
    """The spec's text tower with N(0, 0.02) weights (open_clip's default init has denormals that
    slow CPU matmuls several-fold, see backbones.md)."""
    clip = build_clip(spec)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in clip.named_parameters():
            if name.startswith("visual"):
                continue
            if tensor.ndim == 1:
                tensor.fill_(1.0 if "ln" in name and name.endswith("weight") else 0.0)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return PromptTextEncoder(clip).to(device).eval()


def _models(spec: BackboneSpec, device: torch.device) -> RunModels:
    d, width, patches = spec.embed_dim, spec.vision_width, spec.num_patches
    layers = len(spec.memory_layers)
    preset = get_preset("official")
    tokens = spec.qformer.num_query_tokens
    generator = PromptGenerator(GeneratorConfig.from_preset(preset, width=d, query_tokens=tokens)).to(device).eval()
    banks = Banks(
        query=normalise(torch.randn(BANK_IMAGES, tokens, d)).to(device),
        prompt=normalise(torch.randn(BANK_IMAGES, 2, d)).to(device),
        mem=normalise(torch.randn(layers, BANK_IMAGES, patches, width)).to(device),
        memory_layers=spec.memory_layers,
        paths=[f"bank{i}.png" for i in range(BANK_IMAGES)],
        classes=["x"] * BANK_IMAGES,
        metadata={},
    )
    return RunModels(
        run_dir=Path("."),
        features_attrs={},
        features_sha="",
        generator=generator,
        generator_sha="",
        preset=preset,
        backbone=SimpleNamespace(text_encoder=_text_encoder(spec, device)),  # type: ignore[arg-type]
        device=device,
        banks=banks,
    )


def _features(spec: BackboneSpec, count: int, device: torch.device) -> dict[str, torch.Tensor]:
    d, width, patches = spec.embed_dim, spec.vision_width, spec.num_patches
    return {
        "cls_token": torch.randn(count, 2, d, device=device),
        "qformer": torch.randn(count, spec.qformer.num_query_tokens, d, device=device),
        "vv": torch.randn(count, len(spec.vv_layers), patches, d, device=device),
        "mem": torch.randn(count, len(spec.memory_layers), patches, width, device=device),
    }


def bench_features(backbone_id: str, images: int, device: torch.device) -> dict[str, Any]:
    spec = get_spec(backbone_id)
    models = _models(spec, device)
    features = _features(spec, images, device)
    names = [str(i) for i in range(images)]
    score_features(models, {k: v[:2] for k, v in features.items()}, names[:2], top_k=1, resolution=224, sigma=4.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    for start in range(0, images, DEFAULT_BATCH):
        batch = {k: v[start : start + DEFAULT_BATCH] for k, v in features.items()}
        score_features(models, batch, names[start : start + DEFAULT_BATCH], top_k=1, resolution=224, sigma=4.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "images_per_s": round(images / seconds, 2),
    }


def bench_stages(shared_data: Path, device: str) -> dict[str, Any]:
    """extract -> train (1 epoch) -> bank untimed; then score and predict as the stages report."""
    from iipad_cli.stages.bank import BankOptions, build_banks
    from iipad_cli.stages.extract import ExtractOptions, run_extract
    from iipad_cli.stages.predict import PredictOptions, predict
    from iipad_cli.stages.score import ScoreOptions, score_run
    from iipad_cli.stages.train import TrainOptions, train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = root / "prompts.json"
        prompts.write_text(json.dumps({"normal": ["a flawless object"], "anomalous": ["a damaged object"]}))
        run = run_extract(
            ExtractOptions(
                data=shared_data / "mvtec", shots=1, output=root / "run", backbone="tiny",
                classes=("bottle", "tire"), workers=0, device=device, quiet=True, cache=root / "store",
            )
        )
        train(run, TrainOptions(epochs=1, prompts=prompts, device=device, quiet=True))
        build_banks(run, BankOptions(device=device, quiet=True))
        score_run(run, ScoreOptions(device=device, quiet=True))
        score_entry = json.loads((run / "manifest.json").read_text())["stages"]["score"]
        started = time.perf_counter()
        score_run(run, ScoreOptions(device=device, quiet=True, heatmaps_dir=root / "heatmaps"))
        with_heatmaps = time.perf_counter() - started
        images = [str(p) for p in sorted((shared_data / "mvtec" / "bottle" / "test").rglob("*.png"))]
        result = predict(run, images, root / "predict", PredictOptions(device=device, quiet=True))
        predict_info = json.loads((result.out_dir / "predict.json").read_text())
        return {
            "score_tiny": {"images": score_entry["images"], "images_per_s": score_entry["images_per_s"]},
            "score_tiny_with_heatmaps_total_s": round(with_heatmaps, 2),
            "predict_tiny": {"images": predict_info["scored"], "images_per_s": predict_info["images_per_s"]},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--images", type=int, default=16, help="images for the feature-tensor benchmarks")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    shared = Path(os.environ.get("IIPAD_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    with torch.inference_mode():
        results: dict[str, Any] = {
            "score_features_tiny": bench_features("tiny", args.images, device),
            "score_features_vit_l_14": bench_features("vit-l-14", args.images, device),
        }
    results.update(bench_stages(shared, args.device))
    results["machine"] = machine_info(args.device)
    emit_report(results, args.json)


if __name__ == "__main__":
    main()
