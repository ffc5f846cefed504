"""Two `iipad extract` processes at once on one store, and `iipad extract` killed (SIGKILL) at random
moments: the store always verifies and the rerun encodes only what is missing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from iipad_cli.schema.features import read_split
from iipad_cli.store import FeatureStore

REPO_ROOT = Path(__file__).resolve().parents[1]


# Decoding each image takes 50 ms longer, so that a fast machine cannot finish a whole extract
# between a seal and a kill (a kill after everything is indexed would test no partial state).
SLOW_DECODING = (
    "import sys, time, iipad_cli.stages.encoding as e\n"
    "decode = e.preprocess_image\n"
    "def slow(*args):\n    time.sleep(0.05)\n    return decode(*args)\n"
    "e.preprocess_image = slow\n"
    "from iipad_cli.cli import main\nsys.argv = ['iipad', *sys.argv[1:]]\nmain()\n"
)


def _extract(data: Path, out: Path, cache: Path, *extra: str, slow: bool = False) -> subprocess.Popen[str]:
    program = ["-c", SLOW_DECODING] if slow else ["-m", "iipad_cli.cli"]
    args = [sys.executable, *program, "extract", str(data), "-k", "2", "--backbone", "tiny", "--device", "cpu"]
    args += ["--workers", "0", "--batch-size", "2", "-q", "-o", str(out), "--cache", str(cache), *extra]
    # Seal a segment after every batch, so a kill lands between, during and after seals.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "IIPAD_STORE_SEAL_SECONDS": "0"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _indexed(cache: Path) -> int:
    with FeatureStore(cache) as store:
        return sum(b.images for b in store.info().backbones) if store.exists() else 0


def _entry(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]["extract"]


def test_two_extract_processes_at_once_both_succeed(shared_data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "store"
    data = shared_data / "visa"
    first, second = _extract(data, tmp_path / "a", cache), _extract(data, tmp_path / "b", cache)
    for process in (first, second):
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    store = FeatureStore(cache)
    report = store.verify()
    assert report.ok, report.problems
    needed = _entry(tmp_path / "a")["images_encoded"] + _entry(tmp_path / "a")["images_from_store"]
    assert sum(b.images for b in store.info().backbones) == needed
    for split in ("train", "test"):
        a, b = read_split(tmp_path / "a" / "features.h5", split), read_split(tmp_path / "b" / "features.h5", split)
        for name in ("path", "vv", "mem", "qformer", "cls_token"):
            assert np.array_equal(np.asarray(a[name]), np.asarray(b[name])), (split, name)


def test_extract_killed_at_random_moments_leaves_a_store_that_verifies(shared_data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "store"
    data = shared_data / "mvtec"
    rng = random.Random(5)
    indexed = 0
    for attempt in range(4):
        process = _extract(data, tmp_path / "run", cache, slow=True)
        if attempt == 0:
            time.sleep(rng.uniform(0.0, 3.0))  # while Python, torch and the hashing start
        else:
            # Once this process has sealed a segment, kill it at a random moment after that:
            # while encoding, while writing a segment, between rename and index commit, ...
            deadline = time.monotonic() + 300
            while _indexed(cache) <= indexed and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is not None:
            break  # it finished before the kill (a fast machine): the kills so far are the test
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        store = FeatureStore(cache)
        report = store.verify()
        assert report.ok, (attempt, report.problems)
        now = _indexed(cache)
        assert now >= indexed
        indexed = now
        store.close()
        assert not (tmp_path / "run" / "features.h5").exists()
    process = _extract(data, tmp_path / "run", cache)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    entry = _entry(tmp_path / "run")
    assert 0 < indexed < entry["images_encoded"] + entry["images_from_store"], "no kill landed mid-run"
    assert entry["images_from_store"] == indexed
    clean = tmp_path / "clean"
    process = _extract(data, clean, tmp_path / "clean-store")
    assert process.communicate(timeout=600) and process.returncode == 0
    for split in ("train", "test"):
        resumed, straight = read_split(tmp_path / "run" / "features.h5", split), read_split(clean / "features.h5", split)
        for name in ("vv", "mem"):
            np.testing.assert_allclose(resumed[name].astype(np.float32), straight[name].astype(np.float32), rtol=2e-3, atol=2e-3)
