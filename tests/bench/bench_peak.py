"""Measured dense fp32 matmul peak of this machine (the denominator of every "ratio to peak").

A square fp32 GEMM of size n costs 2·n³ FLOP; the median over repeats of the largest size is the
practical peak the encoders' matmuls could reach with the same thread count.

    python tests/bench/bench_peak.py --json peak.json [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def measure_gemm(size: int, repeats: int, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Median and best GFLOP/s of `repeats` (size × size) @ (size × size) products after a warm-up.

    Timed by process CPU seconds / threads (the wall time on an idle machine: the development
    machine is shared, and wall-clock GEMM rates there measure the neighbours), with the
    wall-clock rate alongside.
    """
    threads = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator, dtype=dtype)
    b = torch.randn(size, size, generator=generator, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.matmul(a, b, out=out)
    seconds, wall = [], []
    for _ in range(repeats):
        start, wall_start = time.process_time(), time.perf_counter()
        torch.matmul(a, b, out=out)
        seconds.append((time.process_time() - start) / threads)
        wall.append(time.perf_counter() - wall_start)
    flop = 2.0 * size**3
    return {
        "size": size,
        "repeats": repeats,
        "median_s": statistics.median(seconds),
        "median_gflops": flop / statistics.median(seconds) / 1e9,
        "best_gflops": flop / min(seconds) / 1e9,
        "median_wall_gflops": flop / statistics.median(wall) / 1e9,
    }


def run(threads: int, quick: bool) -> dict:
    torch.set_num_threads(threads)
    sizes = (1024, 2048) if quick else (1024, 2048, 4096)
    repeats = 5 if quick else 10
    results = [measure_gemm(size, repeats) for size in sizes]
    peak = max(result["median_gflops"] for result in results)
    return {
        "bench": "peak",
        "threads": threads,
        "dtype": "float32",
        "clock": "process CPU seconds / threads",
        "load_average": os.getloadavg(),
        "gemm": results,
        "peak_gflops": peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = parser.parse_args(argv)
    report = run(args.threads, args.quick)
    for result in report["gemm"]:
        print(f"fp32 GEMM {result['size']}²: {result['median_gflops']:.1f} GFLOP/s median", file=sys.stderr)
    print(f"peak (median of best size): {report['peak_gflops']:.1f} GFLOP/s at {args.threads} threads", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
