"""tests/bench/run_all.py merges each benchmark's JSON, lists missing scripts, reports failures.

Run against stub benchmark scripts in a temp directory (the real ones take minutes on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN_ALL = Path(__file__).resolve().parent / "bench" / "run_all.py"

STUB = """
import argparse, json, sys
parser = argparse.ArgumentParser()
parser.add_argument("--json")
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
open(args.json, "w").write(json.dumps({"peak_gflops": VALUE, "quick": args.quick}))
"""


def _write(directory: Path, name: str, body: str) -> None:
    (directory / f"bench_{name}.py").write_text(body)


def _run(bench_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RUN_ALL), "--out", str(out), "--bench-dir", str(bench_dir), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_merges_results_lists_missing_and_reports_failures(tmp_path: Path) -> None:
    _write(tmp_path, "peak", STUB.replace("VALUE", "123.0"))
    _write(tmp_path, "extra", STUB.replace("VALUE", "7"))
    _write(tmp_path, "broken", "import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    # A script without --quick is run without it (argparse would reject the flag).
    _write(tmp_path, "plain", STUB.replace("VALUE", "5").replace('parser.add_argument("--quick", action="store_true")', "").replace("args.quick", "False"))
    out = tmp_path / "report.json"
    proc = _run(tmp_path, out, "--quick")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(out.read_text())
    benches = report["benchmarks"]
    assert list(benches) == ["peak", "extract", "train", "score", "metrics", "protocol", "broken", "extra", "plain"]
    assert benches["peak"]["status"] == "ok"
    assert benches["peak"]["result"] == {"peak_gflops": 123.0, "quick": True}
    assert benches["extra"]["result"]["peak_gflops"] == 7
    for name in ("extract", "train", "score", "metrics", "protocol"):
        assert benches[name] == {"status": "missing"}
    assert benches["plain"]["status"] == "ok" and benches["plain"]["quick"] is False
    broken = benches["broken"]
    assert broken["status"] == "failed" and broken["returncode"] == 3 and "boom" in broken["error"]
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch_version"]
    assert "fp32 GEMM peak: 123 GFLOP/s" in proc.stdout


def test_only_selects_benchmarks(tmp_path: Path) -> None:
    _write(tmp_path, "peak", STUB.replace("VALUE", "1.0"))
    out = tmp_path / "report.json"
    proc = _run(tmp_path, out, "--only", "peak,protocol")
    assert proc.returncode == 0, proc.stderr
    benches = json.loads(out.read_text())["benchmarks"]
    assert benches == {"peak": benches["peak"], "protocol": {"status": "missing"}}
    assert benches["peak"]["result"]["quick"] is False


def test_summary_states_the_bf16_peak_and_its_ratio(tmp_path: Path) -> None:
    stub = STUB.replace('{"peak_gflops": VALUE, "quick": args.quick}', '{"peak_gflops": 100.0, "peaks_gflops": {"fp32": 100.0, "bf16": 225.0}}')
    _write(tmp_path, "peak", stub)
    proc = _run(tmp_path, tmp_path / "report.json", "--only", "peak")
    assert proc.returncode == 0, proc.stderr
    assert "fp32 GEMM peak: 100 GFLOP/s" in proc.stdout
    assert "bf16 GEMM peak: 225 GFLOP/s (2.25x fp32)" in proc.stdout
