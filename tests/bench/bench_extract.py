"""Throughput of `extract` (images/s) per precision, against the same run's matmul peak, and peak memory.

1. The frozen-encoder pass alone (`Backbone.encode_images` under inference_mode on preprocessed
   random images) for `tiny` and for the full ViT-L/14 + Q-Former architectures with
   re-initialised random weights (`registry.build_random_backbone`: N(0, 0.02), Q-Former vision
   tower tied to CLIP's, so trunk sharing is possible; the cost depends on shapes, not on weight
   values), at batch 1 and 8, with the shared trunk and with the Q-Former running its own tower,
   once per precision (fp32 first, then the same model cast with `Backbone.set_precision("bf16")`).
   Each rate has images/s (wall clock), CPU seconds per image, GFLOP per image
   (`tests/bench/flops.py: extract_macs`) and the fraction of this run's GEMM peak *of that precision*
   (`bench_peak.measure_peaks`, measured before and after the encoder sections; the better of
   the two). Fractions use the CPU clock (process CPU seconds / threads, as bench_peak does):
   on the shared development machine wall clocks measure the neighbours.
2. Fidelity: per feature, bf16 against fp32 on the same 8 fixture images (random weights): the
   relative error ‖bf16 − fp32‖ / ‖fp32‖, the worst and mean per-token cosine similarity, and the
   same figures for fp16 storage of the fp32 features, for scale.
3. The whole stage (`run_extract`: layout, decode, preprocessing, forward, HDF5 writes) with
   `tiny` on the real fixtures (random weights), with 0 and 2 DataLoader workers.

Peak RSS (ru_maxrss) is the process's high-water mark after each section: it only grows, so the
full-size figure includes everything before it.

    python tests/bench/bench_extract.py --json out.json [--images 8] [--tiny-images 32] [--quick]
        [--device cpu] [--threads 2] [--precisions fp32,bf16] [--batches 1,8]
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_peak import machine_flags, measure_peaks  # noqa: E402
from flops import extract_macs, gflop  # noqa: E402

from iipad_cli.data.images import preprocess_image  # noqa: E402
from iipad_cli.data.layouts import load_dataset  # noqa: E402
from iipad_cli.models.backbone import Backbone, ImageFeatures  # noqa: E402
from iipad_cli.models.registry import build_random_backbone, get_spec  # noqa: E402
from iipad_cli.schema.features import FEATURE_FIELDS  # noqa: E402
from iipad_cli.stages.extract import ExtractOptions, run_extract  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FIDELITY_IMAGES = 8


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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
        synchronize(backbone.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for first in range(0, images, batch):
            backbone.encode_images(pixels[first : first + batch], share_trunk=share)
        synchronize(backbone.device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 3),
        "cpu_seconds_per_image": round(cpu_seconds / images, 4),
    }


def with_peak_fraction(rate: dict[str, float], gflop_per_image: float, peak_gflops: float, threads: int) -> dict[str, float]:
    """GFLOP/s by the CPU clock (CPU seconds / threads, bench_peak's clock) and by the wall clock, and
    the CPU-clock rate as a fraction of `peak_gflops`."""
    gflops_cpu = gflop_per_image * threads / rate["cpu_seconds_per_image"]
    return {
        **rate,
        "gflop_per_image": round(gflop_per_image, 2),
        "gflops_cpu_clock": round(gflops_cpu, 1),
        "gflops_wall_clock": round(gflop_per_image * rate["images_per_s"], 1),
        "fraction_of_peak": round(gflops_cpu / peak_gflops, 3),
    }


def fixture_images(size: int, count: int) -> torch.Tensor:
    """The first `count` preprocessed MVTec fixture test images (real pixels for the fidelity check)."""
    dataset = load_dataset(FIXTURES / "mvtec", "auto", None)
    return torch.stack([preprocess_image(sample.path, size)[0] for sample in dataset.test[:count]])


def fidelity(reference: ImageFeatures, approximate: ImageFeatures) -> dict[str, dict[str, float]]:
    """Per feature: relative error and per-token cosine of `approximate` against `reference`, and the
    same for fp16 storage of `reference` (what features.h5 keeps)."""

    def compare(got: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
        tokens_got, tokens_expected = got.double().flatten(0, -2), expected.double().flatten(0, -2)
        cosine = F.cosine_similarity(tokens_got, tokens_expected, dim=-1)
        return {
            "relative_error": float((tokens_got - tokens_expected).norm() / tokens_expected.norm()),
            "min_token_cosine": float(cosine.min()),
            "mean_token_cosine": float(cosine.mean()),
        }

    result = {}
    for name in FEATURE_FIELDS:
        expected = getattr(reference, name).float().cpu()
        result[name] = {
            "bf16_vs_fp32": compare(getattr(approximate, name).float().cpu(), expected),
            "fp16_storage_vs_fp32": compare(expected.half().float(), expected),
        }
    return result


def encoder_section(
    backbone_id: str, images: int, device: torch.device, precisions: tuple[str, ...], batches: tuple[int, ...]
) -> dict[str, Any]:
    started = time.perf_counter()
    spec = get_spec(backbone_id)
    backbone = build_random_backbone(spec).to(device)
    build_seconds = time.perf_counter() - started
    threads = torch.get_num_threads()
    fidelity_pixels = fixture_images(spec.image_size, FIDELITY_IMAGES).to(device)
    peaks_before = measure_peaks(precisions, quick=True) if device.type == "cpu" else {}
    rates: dict[str, dict[str, Any]] = {}
    features: dict[str, ImageFeatures] = {}
    for precision in precisions:  # fp32 first: set_precision only goes fp32 -> bf16
        backbone.set_precision(precision)
        rates[precision] = {}
        with torch.inference_mode():
            features[precision] = backbone.encode_images(fidelity_pixels)
        for batch in batches:
            count = max(images, batch)
            for share in (True, False):
                key = f"b{batch}_{'shared' if share else 'own'}_trunk"
                rates[precision][key] = encoder_rate(backbone, count, batch, share)
                print(
                    f"{backbone_id} {precision} {key}: {rates[precision][key]['images_per_s']:.3f} images/s, "
                    f"{rates[precision][key]['cpu_seconds_per_image']:.3f} CPU s/image",
                    file=sys.stderr,
                    flush=True,
                )
    peaks_after = measure_peaks(precisions, quick=True) if device.type == "cpu" else {}
    result: dict[str, Any] = {
        "backbone": backbone_id,
        "weights": "random (re-initialised N(0, 0.02), trunk tied)",
        "trunk_shared": backbone.trunk_shared,
        "build_seconds": round(build_seconds, 2),
        "rates": rates,
    }
    if peaks_before:
        peaks = {p: max(peaks_before[p]["peak_gflops"], peaks_after[p]["peak_gflops"]) for p in precisions}
        result["peaks_gflops"] = {p: round(v, 1) for p, v in peaks.items()}
        result["peaks_gflops_before_after"] = {
            p: [round(peaks_before[p]["peak_gflops"], 1), round(peaks_after[p]["peak_gflops"], 1)] for p in precisions
        }
        for precision in precisions:
            for key, rate in rates[precision].items():
                macs = extract_macs(spec, share_trunk=key.endswith("shared_trunk"))
                rates[precision][key] = with_peak_fraction(rate, gflop(sum(macs.values())), peaks[precision], threads)
    speedups = {}
    for precision in precisions:
        for batch in batches:
            shared, own = rates[precision][f"b{batch}_shared_trunk"], rates[precision][f"b{batch}_own_trunk"]
            speedups[f"trunk_sharing_{precision}_b{batch}"] = round(shared["images_per_s"] / own["images_per_s"], 3)
    if "fp32" in precisions and "bf16" in precisions:
        for key in rates["fp32"]:
            fp32_rate, bf16_rate = rates["fp32"][key], rates["bf16"][key]
            speedups[f"bf16_over_fp32_{key}_wall"] = round(bf16_rate["images_per_s"] / fp32_rate["images_per_s"], 3)
            speedups[f"bf16_over_fp32_{key}_cpu"] = round(
                fp32_rate["cpu_seconds_per_image"] / bf16_rate["cpu_seconds_per_image"], 3
            )
        result["fidelity_bf16"] = {
            "images": f"{FIDELITY_IMAGES} MVTec fixture test images, random weights",
            **fidelity(features["fp32"], features["bf16"]),
        }
    result["speedups"] = speedups
    result["peak_rss_mib_after"] = round(peak_rss_mib(), 1)
    return result


def goal_check(section: dict[str, Any]) -> dict[str, Any]:
    """Issue 14's goal at batch 8 (shared trunk): bf16 >= 3x fp32 in the same run, >= 0.5 of the bf16 peak."""
    rates = section["rates"]
    if not {"fp32", "bf16"} <= set(rates) or "b8_shared_trunk" not in rates["bf16"]:
        return {}
    bf16 = rates["bf16"]["b8_shared_trunk"]
    speedup = section["speedups"]["bf16_over_fp32_b8_shared_trunk_cpu"]
    fraction = bf16.get("fraction_of_peak")
    return {
        "bf16_over_fp32_b8_cpu_clock": speedup,
        "bf16_fraction_of_bf16_peak_b8": fraction,
        "bf16_peak_over_fp32_peak": round(section["peaks_gflops"]["bf16"] / section["peaks_gflops"]["fp32"], 3)
        if "peaks_gflops" in section
        else None,
        "speedup_goal_3x_met": speedup >= 3.0,
        "peak_fraction_goal_0.5_met": fraction is not None and fraction >= 0.5,
    }


def stage_section(device: str, workers: int) -> dict[str, Any]:
    """`run_extract` on the MVTec fixtures (3 classes, 1 shot): the rate the stage records in the manifest.

    An empty feature store of its own, so every image is encoded, and a self-contained features.h5
    (`copy`), as the stage wrote it before the store existed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run_extract(
            ExtractOptions(
                data=FIXTURES / "mvtec", shots=1, output=out, backbone="tiny", workers=workers, device=device, quiet=True,
                cache=Path(tmp) / "store", copy=True,
            )
        )
        entry = json.loads((out / "manifest.json").read_text())["stages"]["extract"]
        size_mib = (out / "features.h5").stat().st_size / 2**20
    print(f"stage tiny workers={workers}: {entry['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
    return {
        "workers": workers,
        "images": entry["images_encoded"],
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
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated, fp32 before bf16 [fp32,bf16]")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes [1,8]")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    precisions = tuple(args.precisions.split(","))
    if list(precisions) != sorted(precisions, key=("fp32", "bf16").index):
        parser.error("--precisions: fp32 must come before bf16 (the model is cast once, fp32 -> bf16)")
    batches = tuple(int(batch) for batch in args.batches.split(","))
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "benchmark": "extract",
        "precisions": list(precisions),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": machine_flags(),
        "load_average_at_start": os.getloadavg(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "encoders": {"tiny": encoder_section("tiny", args.tiny_images, device, precisions, batches)},
    }
    result["stage_tiny"] = [stage_section(args.device, workers) for workers in (0, 2)]
    if not args.quick:
        result["encoders"]["vit-l-14"] = encoder_section("vit-l-14", args.images, device, precisions, batches)
        result["goal_vit_l_14"] = goal_check(result["encoders"]["vit-l-14"])
    result["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
