"""Scaling efficiency of `iipad extract` and `iipad predict` under torchrun on this machine.

The same images, in one run of this script: the command as one process with one CPU thread, then
`torchrun --standalone --nproc-per-node N --no-python iipad ...` with one thread per rank.
For each: the command's wall time, the CPU seconds of all its processes (torchrun's agent
included, from the children's rusage) and the ranks' own seconds and CPU seconds for their shard
(recorded by iipad in the manifest / predict.json: the part that parallelises).

    scaling efficiency = t(1 process) / (N x t(N ranks))      (1.0 = perfect)

On a shared machine wall times measure the neighbours too; CPU seconds per image do not, and a
CPU-s/image that grows with N shows contention inside the box (memory bandwidth, caches).
Random weights everywhere (`tiny`, or the full ViT-L/14 + Q-Former architectures re-initialised
and exported to a temporary weights directory with `--backbone vit-l-14`): the cost depends on
the shapes, not on the values.

    python tests/bench/bench_scale.py --json out.json [--images 192] [--nproc 2] [--backbone tiny] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO_ROOT))

from _report import emit_report  # noqa: E402


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", IIPAD_CACHE=str(cache))
    return env


def make_data(root: Path, images: int, size: int) -> Path:
    """A Folder-layout data set of distinct images (seeded smooth noise, PNG): `images` test images
    and 2 normal training images in one class. Distinct bytes, so the store dedupes nothing."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("test", images)):
        folder = root / "part" / split / "good"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            coarse = rng.integers(0, 256, size=(size // 16, size // 16, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
            image.save(folder / f"{index:05d}.png")
    return root


def export_random_weights(backbone_id: str, directory: Path) -> Path:
    from iipad_cli.checkpoints import export_weights
    from iipad_cli.models.registry import build_random_backbone, get_spec

    export_weights(build_random_backbone(get_spec(backbone_id)), directory)
    return directory


def timed(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Wall seconds and the CPU seconds of every process the command started (rusage of children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}


def torchrun(nproc: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "--no-python"]


def extract_ranks(run_dir: Path) -> list[dict[str, Any]]:
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["extract"]
    return entry["ranks"]


def predict_ranks(out_dir: Path) -> list[dict[str, Any]]:
    return json.loads((out_dir / "predict.json").read_text())["ranks"]


def summarise(one: dict[str, Any], many: dict[str, Any], nproc: int, images: int) -> dict[str, Any]:
    def shard_seconds(result: dict[str, Any]) -> float:
        return max(rank["seconds"] for rank in result["ranks"])

    def shard_cpu(result: dict[str, Any]) -> float:
        return sum(rank["cpu_seconds"] for rank in result["ranks"])

    return {
        "images": images,
        "one_process": one,
        f"{nproc}_ranks": many,
        "efficiency_command_wall": round(one["seconds"] / (nproc * many["seconds"]), 3),
        "efficiency_shard_wall": round(shard_seconds(one) / (nproc * shard_seconds(many)), 3),
        "cpu_seconds_per_image_one": round(shard_cpu(one) / images, 4),
        f"cpu_seconds_per_image_{nproc}_ranks": round(shard_cpu(many) / images, 4),
        "command_cpu_seconds_ratio": round(many["cpu_seconds"] / one["cpu_seconds"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--backbone", default="tiny", choices=("tiny", "vit-l-14"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="64 images")
    parser.add_argument("--stages", default="extract,predict")
    args = parser.parse_args()
    images = 64 if args.quick else args.images
    stages = args.stages.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        data = make_data(work / "data", images, args.image_size)
        weights = ["--weights", str(export_random_weights(args.backbone, work / "weights"))] if args.backbone != "tiny" else []
        common = ["--backbone", args.backbone, *weights, "--shots", "1", "--device", "cpu", "--workers", "0",
                  "--batch-size", str(args.batch_size), "--quiet"]
        results: dict[str, Any] = {
            "backbone": args.backbone,
            "note": "random weights; one CPU thread per process; wall times on a shared machine",
            "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "nproc": args.nproc,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
        }
        runs = {"one": work / "run-one", "many": work / "run-many"}
        caches = {"one": work / "cache-one", "many": work / "cache-many"}
        # One process's extract always runs: predict scores with the run it makes.
        one = timed([str(BIN / "iipad"), "extract", str(data), *common, "-o", str(runs["one"])], _env(caches["one"]))
        if "extract" in stages:
            one["ranks"] = extract_ranks(runs["one"])
            many = timed(
                [*torchrun(args.nproc), str(BIN / "iipad"), "extract", str(data), *common, "-o", str(runs["many"])],
                _env(caches["many"]),
            )
            many["ranks"] = extract_ranks(runs["many"])
            results["extract"] = summarise(one, many, args.nproc, images + 1)
        if "predict" in stages:
            env = _env(caches["one"])
            # score makes the label-free thresholds.json that predict decides with.
            for step in (["train", str(runs["one"]), "--epochs", "1"], ["bank", str(runs["one"])], ["score", str(runs["one"])]):
                timed([str(BIN / "iipad"), *step, *weights, "--device", "cpu", "--quiet"], env)
            test_dir = str(data / "part" / "test")
            predict = [str(BIN / "iipad"), "predict", str(runs["one"]), test_dir, *weights, "--device", "cpu",
                       "--batch-size", str(args.batch_size), "--quiet"]
            one = timed([*predict, "-o", str(work / "pred-one")], env)
            one["ranks"] = predict_ranks(work / "pred-one")
            many = timed([*torchrun(args.nproc), *predict, "-o", str(work / "pred-many")], env)
            many["ranks"] = predict_ranks(work / "pred-many")
            results["predict"] = summarise(one, many, args.nproc, images)
        results["load_average_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit_report(results, args.json)


if __name__ == "__main__":
    main()
