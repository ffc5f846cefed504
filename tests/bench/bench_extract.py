"""Throughput of `extract` (images/s) and peak memory, fp32.

1. The frozen-encoder pass alone (`Backbone.encode_images` under inference_mode on preprocessed
   random images) for `tiny` and for the full ViT-L/14 + Q-Former architectures with
   re-initialised random weights (`registry.build_random_backbone`: N(0, 0.02), Q-Former vision
   tower tied to CLIP's, so trunk sharing is possible; the cost depends on shapes, not on weight
   values), at batch 1 and 8, with the shared trunk and with the Q-Former running its own tower.
2. The whole stage (`run_extract`: layout, decode, preprocessing, forward, HDF5 writes) with
   `tiny` on the real fixtures (random weights), with 0 and 2 DataLoader workers.

Peak RSS (ru_maxrss) is the process's high-water mark after each section: it only grows, so the
full-size figure includes everything before it.

    python tests/bench/bench_extract.py --json out.json [--images 8] [--tiny-images 32] [--quick] [--device cpu] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from iipad_cli.models.backbone import Backbone  # noqa: E402
from iipad_cli.models.registry import build_random_backbone, get_spec  # noqa: E402
from iipad_cli.stages.extract import ExtractOptions, run_extract  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def encoder_rate(backbone: Backbone, images: int, batch: int, share: bool) -> dict[str, float]:
    """images/s of `images` images in batches of `batch`, after one warm-up batch of 1.

    Also the process CPU time per image: on a shared, overloaded machine wall-clock rates measure
    the neighbours, while CPU seconds per image stay close to the cost on an idle machine.
    """
    size = backbone.spec.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(images, 3, size, size, generator=generator).to(backbone.device)
    with torch.inference_mode():
        backbone.encode_images(pixels[:1], share_trunk=share)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        for first in range(0, images, batch):
            backbone.encode_images(pixels[first : first + batch], share_trunk=share)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 3),
        "cpu_seconds_per_image": round(cpu_seconds / images, 4),
    }


def encoder_section(backbone_id: str, images: int, device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    backbone = build_random_backbone(get_spec(backbone_id)).to(device)
    build_seconds = time.perf_counter() - started
    rates: dict[str, Any] = {}
    for batch in (1, 8):
        count = max(images, batch)
        for share in (True, False):
            key = f"b{batch}_{'shared' if share else 'own'}_trunk"
            rates[key] = encoder_rate(backbone, count, batch, share)
            print(
                f"{backbone_id} {key}: {rates[key]['images_per_s']:.3f} images/s, "
                f"{rates[key]['cpu_seconds_per_image']:.3f} CPU s/image",
                file=sys.stderr,
                flush=True,
            )
    return {
        "backbone": backbone_id,
        "weights": "random (re-initialised N(0, 0.02), trunk tied)",
        "trunk_shared": backbone.trunk_shared,
        "build_seconds": round(build_seconds, 2),
        "rates": rates,
        "trunk_sharing_speedup_b1": round(rates["b1_shared_trunk"]["images_per_s"] / rates["b1_own_trunk"]["images_per_s"], 3),
        "trunk_sharing_speedup_b8": round(rates["b8_shared_trunk"]["images_per_s"] / rates["b8_own_trunk"]["images_per_s"], 3),
        "peak_rss_mib_after": round(peak_rss_mib(), 1),
    }


def stage_section(device: str, workers: int) -> dict[str, Any]:
    """`run_extract` on the MVTec fixtures (3 classes, 1 shot): the rate the stage records in the manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run_extract(
            ExtractOptions(
                data=FIXTURES / "mvtec", shots=1, output=out, backbone="tiny", workers=workers, device=device, quiet=True
            )
        )
        entry = json.loads((out / "manifest.json").read_text())["stages"]["extract"]
        size_mib = (out / "features.h5").stat().st_size / 2**20
    print(f"stage tiny workers={workers}: {entry['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
    return {
        "workers": workers,
        "images": entry["images"],
        "images_per_s": entry["images_per_s"],
        "stage_seconds": entry["seconds"],
        "features_mib": round(size_mib, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--images", type=int, default=8, help="images per full-size measurement (at least the batch)")
    parser.add_argument("--tiny-images", type=int, default=32, help="images per tiny measurement")
    parser.add_argument("--quick", action="store_true", help="tiny only, plus the stage; no full-size model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "benchmark": "extract",
        "dtype": "float32",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "encoders": {"tiny": encoder_section("tiny", args.tiny_images, device)},
    }
    result["stage_tiny"] = [stage_section(args.device, workers) for workers in (0, 2)]
    if not args.quick:
        result["encoders"]["vit-l-14"] = encoder_section("vit-l-14", args.images, device)
    result["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
