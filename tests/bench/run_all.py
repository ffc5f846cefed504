"""Run every benchmark in tests/bench/ and merge their results into one JSON report.

    python tests/bench/run_all.py --out bench-report.json [--quick] [--only peak,protocol]

Each `bench_<name>.py` is run in its own process as `python bench_<name>.py --json TMP [--quick]`
(--quick only where the script has that option)
(a fresh process per stage, so one stage's allocations and thread pools do not bias the next).
The report holds the machine (CPU model, cores, torch version and threads, GPU if any), then per
benchmark its status (ok / failed / missing), wall time and the JSON it wrote. An expected script
that does not exist yet is listed as missing, not an error. Exit code 1 if any benchmark failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# The measured matmul peak runs first: every other stage's "ratio to peak" divides by it.
EXPECTED = ("peak", "extract", "train", "score", "metrics", "protocol")
ERROR_TAIL = 2000


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }
    return info


def discover(bench_dir: Path, only: set[str] | None) -> list[tuple[str, Path | None]]:
    """(name, script or None when missing): the expected stages in order, then any other bench_*.py."""
    found = {path.stem.removeprefix("bench_"): path for path in sorted(bench_dir.glob("bench_*.py"))}
    names = list(EXPECTED) + sorted(name for name in found if name not in EXPECTED)
    if only is not None:
        names = [name for name in names if name in only]
    return [(name, found.get(name)) for name in names]


def supports_quick(script: Path) -> bool:
    """Whether the script declares a --quick option (not every stage has a smaller variant)."""
    return '"--quick"' in script.read_text()


def run_one(script: Path, quick: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        quick = quick and supports_quick(script)
        command = [sys.executable, str(script), "--json", str(out)] + (["--quick"] if quick else [])
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "seconds": time.perf_counter() - start, "error": f"timed out after {timeout:.0f} s"}
        seconds = time.perf_counter() - start
        entry: dict = {"seconds": seconds, "quick": quick}
        if proc.returncode != 0 or not out.is_file():
            entry.update(status="failed", returncode=proc.returncode, error=proc.stderr[-ERROR_TAIL:])
            return entry
        try:
            entry["result"] = json.loads(out.read_text())
        except ValueError as error:
            entry.update(status="failed", error=f"invalid JSON written: {error}")
            return entry
        entry["status"] = "ok"
        entry["log"] = proc.stderr[-ERROR_TAIL:]
        return entry


def summary_lines(report: dict) -> list[str]:
    lines = [f"machine: {report['machine']['cpu_model']}, {report['machine']['cpu_count']} cores, torch {report['machine']['torch_version']}"]
    for name, entry in report["benchmarks"].items():
        status = entry["status"]
        seconds = f" in {entry['seconds']:.0f} s" if "seconds" in entry else ""
        lines.append(f"  {name:<10} {status}{seconds}")
    peak = report["benchmarks"].get("peak", {}).get("result", {}).get("peak_gflops")
    if peak:
        lines.append(f"fp32 GEMM peak: {peak:.0f} GFLOP/s")
    bf16_peak = report["benchmarks"].get("peak", {}).get("result", {}).get("peaks_gflops", {}).get("bf16")
    if peak and bf16_peak:
        lines.append(f"bf16 GEMM peak: {bf16_peak:.0f} GFLOP/s ({bf16_peak / peak:.2f}x fp32)")
    protocol = report["benchmarks"].get("protocol", {}).get("result")
    if protocol:
        rate = protocol["rates"].get("extract_b8_shared", {})
        speed = protocol["speedups"]
        lines.append(
            f"extract b8 (shared trunk): {rate.get('gflops', float('nan')):.0f} GFLOP/s = "
            f"{rate.get('fraction_of_peak', float('nan')):.2f} of peak"
        )
        lines.append(
            f"trunk sharing x{speed['trunk_sharing_b1']:.2f} (b1); truncated text x{speed['truncated_text_train_step']:.2f} "
            f"(train step); MVTec 1-shot protocol x{protocol['mvtec_1shot']['predicted_speedup']:.1f} "
            f"(subset measured x{protocol['subset']['measured_speedup']:.1f})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the merged JSON report")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", help="comma-separated benchmark names (e.g. peak,protocol)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    report: dict = {"machine": machine_info(), "quick": args.quick, "benchmarks": {}}
    for name, script in discover(args.bench_dir, only):
        if script is None:
            report["benchmarks"][name] = {"status": "missing"}
            print(f"{name}: missing (no bench_{name}.py)", file=sys.stderr)
            continue
        print(f"{name}: running {script.name} ...", file=sys.stderr, flush=True)
        report["benchmarks"][name] = run_one(script, args.quick, args.timeout)
        print(f"{name}: {report['benchmarks'][name]['status']}", file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("\n".join(summary_lines(report)))
    failed = [name for name, entry in report["benchmarks"].items() if entry["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
