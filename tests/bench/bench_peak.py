"""Measured dense matmul peak of this machine per precision (the denominator of every "ratio to peak").

A square GEMM of size n costs 2·n³ FLOP; the median over repeats of the best size is the practical
peak the encoders' matmuls could reach with the same thread count, in fp32 and in bf16 (the
`--precision bf16` encoders are measured against the bf16 peak). `peak_gflops` stays the fp32
figure; `peaks_gflops` has both, and `bf16_over_fp32` their ratio in this run.

    python tests/bench/bench_peak.py --json peak.json [--threads 2] [--quick] [--precisions fp32,bf16]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from iipad_cli.devices import DTYPES, cpu_flags  # noqa: E402

# The flags that decide `--precision auto` (and the bf16 speed) on a CPU, recorded with every peak.
RELEVANT_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


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


def machine_flags() -> list[str]:
    """The CPU flags among RELEVANT_CPU_FLAGS that this machine has."""
    flags = cpu_flags()
    return [flag for flag in RELEVANT_CPU_FLAGS if flag in flags]


def measure_peaks(precisions: tuple[str, ...], quick: bool) -> dict[str, dict]:
    """{precision: {"gemm": [per size], "peak_gflops": best size's median}} at the current thread count."""
    sizes = (1024, 2048) if quick else (1024, 2048, 4096)
    repeats = 5 if quick else 10
    peaks: dict[str, dict] = {}
    for precision in precisions:
        results = [measure_gemm(size, repeats, DTYPES[precision]) for size in sizes]
        peaks[precision] = {"gemm": results, "peak_gflops": max(result["median_gflops"] for result in results)}
    return peaks


def run(threads: int, quick: bool, precisions: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    torch.set_num_threads(threads)
    peaks = measure_peaks(precisions, quick)
    report = {
        "bench": "peak",
        "threads": threads,
        "dtype": "float32",
        "clock": "process CPU seconds / threads",
        "load_average": os.getloadavg(),
        "cpu_flags": machine_flags(),
        "gemm": peaks["fp32"]["gemm"] if "fp32" in peaks else [],
        "peak_gflops": peaks["fp32"]["peak_gflops"] if "fp32" in peaks else None,
        "gemm_by_precision": {precision: entry["gemm"] for precision, entry in peaks.items()},
        "peaks_gflops": {precision: entry["peak_gflops"] for precision, entry in peaks.items()},
    }
    if "fp32" in peaks and "bf16" in peaks:
        report["bf16_over_fp32"] = peaks["bf16"]["peak_gflops"] / peaks["fp32"]["peak_gflops"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated, from fp32,bf16")
    args = parser.parse_args(argv)
    precisions = tuple(args.precisions.split(","))
    report = run(args.threads, args.quick, precisions)
    for precision, results in report["gemm_by_precision"].items():
        for result in results:
            print(f"{precision} GEMM {result['size']}²: {result['median_gflops']:.1f} GFLOP/s median", file=sys.stderr)
        print(f"{precision} peak: {report['peaks_gflops'][precision]:.1f} GFLOP/s at {args.threads} threads", file=sys.stderr)
    if "bf16_over_fp32" in report:
        print(f"bf16 / fp32 peak: {report['bf16_over_fp32']:.2f} (CPU flags: {' '.join(report['cpu_flags'])})", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
