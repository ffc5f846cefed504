"""What the feature store saves: a small (K, seed) grid on the fixtures, and the MVTec-shaped grid by the FLOP model.

1. Measured, `tiny` backbone (random weights) on the MVTec fixtures: `run_extract` for every
   (K, seed) of the grid (default K in {1, 2}, seeds {0, 1}), three ways, each in this process:
   - per-run extraction, as before the store: every run encodes all its images into a store of
     its own and writes a self-contained `features.h5` (`--copy`);
   - the shared store: the grid's runs share one store and write virtual `features.h5` files;
   - the same grid repeated into new run directories (everything is found in the store).
   For each: images encoded vs images needed (sum over the runs), wall and process CPU seconds
   (the CPU clock is what counts on a shared machine), and the disk of the store and of the run
   directories' `features.h5`.
2. Modelled, ViT-L/14 + Q-Former: the paper's MVTec grid (15 classes, 1,725 test images,
   K in {1, 2, 4} x 5 seeds = 15 runs). Without the store every run encodes its test split and its
   shots; with it each distinct image once: the 1,725 test images plus at most 4 shots per class
   per seed (a seed's K-shot draw extends its (K-1)-shot draw), 300 in all. Extract GFLOP per
   image from `tests/bench/flops.py`; the whole protocol (manual prompts, extract, train, bank,
   score) per run from `iipad_protocol_macs`.

    python tests/bench/bench_store.py --json out.json [--shots 1,2] [--seeds 0,1] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _report import emit_report, machine_info  # noqa: E402
from flops import ProtocolShape, extract_macs, gflop, iipad_protocol_macs  # noqa: E402

from iipad_cli.artifacts import read_manifest  # noqa: E402
from iipad_cli.models.registry import get_spec  # noqa: E402
from iipad_cli.stages.extract import ExtractOptions, run_extract  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "data"
MVTEC_GRID_SHOTS = (1, 2, 4)
MVTEC_GRID_SEEDS = 5


def _disk(paths: list[Path]) -> int:
    return sum(p.stat().st_size for root in paths for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())


def _grid(base: ExtractOptions, root: Path, shots: list[int], seeds: list[int], *, shared: bool, copy: bool) -> dict[str, Any]:
    """run_extract for every (K, seed); a shared store at root/store or one store per run."""
    wall, cpu = time.perf_counter(), time.process_time()
    encoded = needed = 0
    runs = []
    for k in shots:
        for seed in seeds:
            run_dir = root / f"run-{k}shot-seed{seed}"
            cache = root / "store" if shared else root / f"store-{k}-{seed}"
            run_extract(replace(base, shots=k, seed=seed, output=run_dir, cache=cache, copy=copy))
            entry = read_manifest(run_dir)["stages"]["extract"]
            encoded += entry["images_encoded"]
            needed += entry["images_encoded"] + entry["images_from_store"]
            runs.append(run_dir)
    return {
        "runs": len(runs),
        "images_needed": needed,
        "images_encoded": encoded,
        "wall_s": round(time.perf_counter() - wall, 2),
        "cpu_s": round(time.process_time() - cpu, 2),
        "store_bytes": _disk([p for p in root.glob("store*") if p.is_dir()]),
        "run_features_bytes": _disk([run / "features.h5" for run in runs]),
    }


def measured(shots: list[int], seeds: list[int], device: str) -> dict[str, Any]:
    base = ExtractOptions(data=FIXTURES / "mvtec", shots=1, backbone="tiny", workers=0, device=device, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        per_run = _grid(base, root / "per-run", shots, seeds, shared=False, copy=True)
        print(f"per-run extraction: {per_run}", file=sys.stderr, flush=True)
        store = _grid(base, root / "shared", shots, seeds, shared=True, copy=False)
        print(f"shared store: {store}", file=sys.stderr, flush=True)
        # The repeated grid: new run directories, the first grid's store.
        (root / "again").mkdir()
        (root / "again" / "store").symlink_to(root / "shared" / "store")
        again = _grid(base, root / "again", shots, seeds, shared=True, copy=False)
        again["store_bytes"] = 0  # the first grid's store, counted there
        print(f"repeated grid: {again}", file=sys.stderr, flush=True)
    return {
        "grid": {"data": "shared/data/mvtec fixtures", "shots": shots, "seeds": seeds, "backbone": "tiny (random weights)"},
        "per_run_extraction": per_run,
        "shared_store": store,
        "repeated_grid": again,
        "cpu_ratio_per_run_to_store": round(per_run["cpu_s"] / store["cpu_s"], 2),
        "wall_ratio_per_run_to_store": round(per_run["wall_s"] / store["wall_s"], 2),
    }


def modelled() -> dict[str, Any]:
    """The MVTec-shaped grid, ViT-L/14 + Q-Former, by the FLOP model."""
    spec = get_spec("vit-l-14")
    per_image = gflop(sum(extract_macs(spec, share_trunk=True).values()))
    runs = [ProtocolShape(shots=k) for k in MVTEC_GRID_SHOTS for _ in range(MVTEC_GRID_SEEDS)]
    encoded_without = sum(shape.train_images + shape.test_images for shape in runs)
    distinct_shots = ProtocolShape().classes * max(MVTEC_GRID_SHOTS) * MVTEC_GRID_SEEDS
    encoded_with = ProtocolShape().test_images + distinct_shots
    protocol = [iipad_protocol_macs(spec, shape) for shape in runs]
    total_without = gflop(sum(sum(parts.values()) for parts in protocol))
    extract_without = gflop(sum(parts["extract"] for parts in protocol))
    extract_with = encoded_with * per_image
    total_with = total_without - extract_without + extract_with
    return {
        "grid": "MVTec AD: 15 classes, 1725 test images, K in {1, 2, 4} x 5 seeds = 15 runs, ViT-L/14 + Q-Former",
        "extract_gflop_per_image": round(per_image, 1),
        "images_encoded_without_store": encoded_without,
        "images_encoded_with_store_at_most": encoded_with,
        "extract_gflop_without_store": round(extract_without),
        "extract_gflop_with_store_at_most": round(extract_with),
        "protocol_gflop_without_store": round(total_without),
        "protocol_gflop_with_store_at_most": round(total_with),
        "extract_saving": round(1 - extract_with / extract_without, 4),
        "protocol_saving_at_least": round(1 - total_with / total_without, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--shots", default="1,2", help="K values of the measured grid")
    parser.add_argument("--seeds", default="0,1", help="seeds of the measured grid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="K = 1 and seeds 0,1 only")
    args = parser.parse_args(argv)
    shots = [1] if args.quick else [int(v) for v in args.shots.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    results = {"machine": machine_info(args.device), "measured": measured(shots, seeds, args.device), "modelled": modelled()}
    emit_report(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
