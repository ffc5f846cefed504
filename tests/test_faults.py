"""Faults and concurrency (issue 13): a second writer, full disks, file-size limits, read-only
places, dying DataLoader workers and artifacts that do not hold what their schema says.

Everything runs on a generated data set (no real-image fixtures needed) with the `tiny` backbone.
The full-disk cases use a small tmpfs when the tests run as root and can mount one, and a
file-size limit (`ulimit -f`, RLIMIT_FSIZE) otherwise; read-only cases use a read-only bind mount
when possible and permissions otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from iipad_cli.artifacts import BANKS_FILE, FEATURES_FILE, GENERATOR_FILE, MANIFEST_FILE, SCORES_FILE, sha256_file
from iipad_cli.cli import app
from iipad_cli.demo_data import DemoCounts, build_demo_dataset
from iipad_cli.errors import IipadError
from iipad_cli.runlock import LOCK_FILE, run_lock
from iipad_cli.schema.banks import load_banks
from iipad_cli.schema.features import load_features_attrs
from iipad_cli.schema.generator import load_generator
from iipad_cli.schema.scores import read_scores_attrs
from iipad_cli.writes import write_failure

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "tiny", "--device", "cpu", "--quiet"]
ARTIFACTS = (FEATURES_FILE, GENERATOR_FILE, BANKS_FILE, SCORES_FILE)


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _cli(*args: str, timeout: float = 300, limit_bytes: int | None = None, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """`iipad ARGS` in a fresh process (what a user runs), optionally under a file-size limit and
    after `prelude` (Python run before the CLI, e.g. a monkeypatch that provokes a fault)."""

    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    code = f"import sys\n{prelude}\nfrom iipad_cli.cli import main\nsys.argv = ['iipad', *sys.argv[1:]]\nmain()\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=limit
    )


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _mount(*args: str) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture()
def small_fs(tmp_path: Path) -> Iterator[Path | None]:
    """A 3 MB tmpfs, or None where this process cannot mount one (then the tests use `ulimit -f`)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)):
        yield None
        return
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


@contextlib.contextmanager
def _read_only(directory: Path) -> Iterator[str]:
    """Make `directory` read-only: a read-only bind mount onto itself (root), else chmod; yields
    the errno meaning a write there reports."""
    if _mount("--bind", str(directory), str(directory)):
        try:
            if _mount("-o", "remount,ro,bind", str(directory)):
                yield "read-only file system"
                return
        finally:
            subprocess.run(["umount", str(directory)], check=True)
    if os.geteuid() == 0:
        pytest.skip("root without mount(8): neither a read-only mount nor permissions can stop a write")
    mode = directory.stat().st_mode
    directory.chmod(0o555)
    try:
        yield "permission denied"
    finally:
        directory.chmod(mode)


def _fill(directory: Path) -> None:
    """Take every free byte of `directory`'s file system."""
    fd = os.open(directory / "ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 64 << 10, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def _hashes(run_dir: Path) -> dict[str, str]:
    return {name: sha256_file(run_dir / name) for name in (*ARTIFACTS, MANIFEST_FILE) if (run_dir / name).is_file()}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults-data") / "data"
    build_demo_dataset(root, size=128, counts=DemoCounts(train_good=2, test_good=1, per_defect=1))
    return root


@pytest.fixture(scope="module")
def complete_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """extract -> train (1 epoch) -> bank -> score on two generated classes."""
    run_dir = tmp_path_factory.mktemp("faults-run") / "run"
    steps = [
        ("extract", str(data), "--shots", "1", "--classes", "wood,weave", "--workers", "0", "-o", str(run_dir)),
        ("train", str(run_dir), "--epochs", "1"),
        ("bank", str(run_dir)),
        ("score", str(run_dir)),
    ]
    for step in steps:
        code, _out, err = _invoke(*step, *(TINY if step[0] == "extract" else ["--device", "cpu", "--quiet"]))
        assert code == 0, f"{step[0]}: {err}"
    return run_dir


def _copy(run_dir: Path, target: Path) -> Path:
    shutil.copytree(run_dir, target)
    return target


# --- the run-directory lock -------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from iipad_cli.runlock import run_lock
with run_lock(Path(sys.argv[1]), "extract"):
    print("locked", flush=True)
    time.sleep(120)
"""


def _holder(run_dir: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def test_a_second_writer_is_refused_and_deletes_nothing(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        # What the first writer is writing: the second used to take it for a crash leftover.
        partial = run_dir / (FEATURES_FILE + ".partial")
        partial.write_bytes(b"being written by the holder")
        code, out, err = _invoke("extract", str(data), "--shots", "1", "-o", str(run_dir), *TINY)
        assert code == 1 and out == ""
        line = _one_error_line(err)
        assert f"{run_dir} is in use by pid {holder.pid} on " in line and "`iipad extract`" in line
        assert partial.read_bytes() == b"being written by the holder"
        for stage in ("train", "bank", "score"):
            code, _out, err = _invoke(stage, str(run_dir), "--quiet")
            assert code == 1 and f"in use by pid {holder.pid}" in _one_error_line(err)
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # Its record is still in the file; the kernel released the lock with the process.
    assert str(holder.pid) in (run_dir / LOCK_FILE).read_text()
    code, out, err = _invoke("extract", str(data), "--shots", "1", "--classes", "wood", "--workers", "0", "-o", str(run_dir), *TINY)
    assert code == 0, err
    assert out.strip() == str(run_dir)
    assert load_features_attrs(run_dir / FEATURES_FILE)["complete"]


def test_the_lock_is_reentrant_within_a_process_and_released_after(tmp_path: Path) -> None:
    with run_lock(tmp_path, "run"):
        with run_lock(tmp_path, "train"):
            pass
        assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "run"
    # Released: another process can take it at once.
    holder = _holder(tmp_path)
    holder.kill()
    holder.wait()


def test_a_missing_run_directory_is_not_created_by_later_stages(tmp_path: Path) -> None:
    code, _out, err = _invoke("train", str(tmp_path / "nowhere"), "--quiet")
    assert code == 1 and "no such run directory" in _one_error_line(err)
    assert not (tmp_path / "nowhere").exists()


# --- full disks and file-size limits ------------------------------------------------------------


def test_extract_on_a_full_disk_fails_before_the_work_in_one_line(data: Path, small_fs: Path | None, tmp_path: Path) -> None:
    run_dir = (small_fs or tmp_path) / "run"
    limit = None if small_fs is not None else 64 << 10  # below the file's size
    result = _cli("extract", str(data), "--shots", "1", "-o", str(run_dir), *TINY, limit_bytes=limit)
    assert result.returncode == 1, result.stderr  # not 139 (h5py's segfault) and no traceback
    line = _one_error_line(result.stderr)
    assert "features.h5.partial: needs about" in line
    assert ("free some space" in line) if small_fs is not None else ("ulimit -f" in line)
    assert _leftovers(run_dir) == []
    assert result.stdout == ""


def test_every_later_stage_on_a_full_disk_is_one_line_and_keeps_the_artifacts(
    complete_run: Path, small_fs: Path | None, tmp_path: Path
) -> None:
    size = sum(p.stat().st_size for p in complete_run.iterdir())
    if small_fs is not None:
        subprocess.run(["mount", "-o", f"remount,size={size + (1 << 20)}", str(small_fs)], check=True)
        run_dir = _copy(complete_run, small_fs / "run")
        _fill(small_fs)
        limit = None
    else:
        run_dir = _copy(complete_run, tmp_path / "run")
        limit = 64  # bytes: every artifact is larger
    before = _hashes(run_dir)
    for stage in ("train", "bank", "score"):
        result = _cli(stage, str(run_dir), "--device", "cpu", "--quiet", limit_bytes=limit)
        assert result.returncode == 1, f"{stage}: {result.returncode} {result.stderr}"
        line = _one_error_line(result.stderr)
        assert str(run_dir) in line and ("no space left on device" in line or "ulimit -f" in line or "file-size limit" in line)
        assert _hashes(run_dir) == before, stage
        assert _leftovers(run_dir) == [], stage
    # metrics prints its numbers even where it cannot save them.
    result = _cli("metrics", str(run_dir), "--json", limit_bytes=limit)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mean"]
    assert "warning: results not saved" in result.stderr and "Traceback" not in result.stderr
    assert _hashes(run_dir) == before and _leftovers(run_dir) == []


WRITE_FAILS_MID_FILE = """
import resource, os
from pathlib import Path
import iipad_cli.schema.features as features
import iipad_cli.stages.extract as extract

# Let the checks before the work pass, then take the space (or lower the limit) as if another
# process had done it during the run: the HDF5 write itself fails.
features.require_space = lambda path, needed: None
extract.require_space = lambda path, needed: None
original = features.FeaturesWriter.append
def append(self, split, columns):
    if self.rows_written("train") > 0:
        if {limit}:
            resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(self.path), resource.RLIM_INFINITY))
        else:
            fd = os.open(self.path.parent.parent / "ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            for size in (1 << 20, 4096, 1):
                try:
                    while True:
                        os.write(fd, b"\\0" * size)
                except OSError:
                    pass
            os.close(fd)
    return original(self, split, columns)
features.FeaturesWriter.append = append
"""


def test_a_write_that_fails_inside_hdf5_is_one_line_not_a_segfault(data: Path, small_fs: Path | None, tmp_path: Path) -> None:
    if small_fs is not None:
        subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    run_dir = (small_fs or tmp_path) / "run"
    prelude = WRITE_FAILS_MID_FILE.replace("{limit}", str(small_fs is None))
    result = _cli("extract", str(data), "--shots", "1", "--batch-size", "2", "--workers", "0", "-o", str(run_dir), *TINY, prelude=prelude)
    assert result.returncode == 1, f"{result.returncode}: {result.stderr[-2000:]}"
    line = _one_error_line(result.stderr)
    assert "features.h5.partial: cannot write:" in line
    assert ("ENOSPC" in line) if small_fs is not None else ("EFBIG" in line)
    assert _leftovers(run_dir) == []
    if small_fs is not None:
        # The way out the message names works: with space again, a rerun finishes the file.
        (small_fs / "ballast").unlink()
        result = _cli("extract", str(data), "--shots", "1", "--workers", "0", "-o", str(run_dir), *TINY)
        assert result.returncode == 0, result.stderr
        assert load_features_attrs(run_dir / FEATURES_FILE)["complete"]


LIMIT_BEFORE_WORKERS = """
import resource
import iipad_cli.stages.extract as extract
original = extract.DataLoader
def loader(*args, **kwargs):
    # `ulimit -f` that the features file fits under but a batch in /dev/shm does not.
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    return original(*args, **kwargs)
extract.DataLoader = loader
"""


def test_a_worker_that_cannot_hand_over_a_batch_is_reported_not_waited_for(data: Path, tmp_path: Path) -> None:
    """The worker's hand-over through /dev/shm fails (file-size limit): it used to be printed by
    the queue's feeder thread while the main process waited forever."""
    started = time.monotonic()
    result = _cli(
        "extract", str(data), "--shots", "1", "--batch-size", "8", "--workers", "1", "-o", str(tmp_path / "run"), *TINY,
        prelude=LIMIT_BEFORE_WORKERS, timeout=240,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    line = _one_error_line(result.stderr)
    assert "DataLoader worker could not pass decoded images through shared memory" in line and "--workers 0" in line
    assert time.monotonic() - started < 120


KILL_WORKER = """
import os, signal
import iipad_cli.stages.extract as extract
from torch.utils.data import get_worker_info
original = extract.preprocess_image
def preprocess(path, size):
    if get_worker_info() is not None:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return original(path, size)
extract.preprocess_image = preprocess
"""


def test_a_worker_killed_by_the_oom_killer_is_reported_within_seconds(data: Path, tmp_path: Path) -> None:
    result = _cli("extract", str(data), "--shots", "1", "--workers", "1", "-o", str(tmp_path / "run"), *TINY, prelude=KILL_WORKER, timeout=240)
    assert result.returncode == 1, result.stderr[-2000:]
    line = _one_error_line(result.stderr)
    assert "image decoding failed: DataLoader worker" in line and "--workers 0" in line


# --- read-only places -----------------------------------------------------------------------------


def test_train_on_a_read_only_run_fails_before_training(complete_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import iipad_cli.stages.train as train_stage

    run_dir = _copy(complete_run, tmp_path / "run")
    before = _hashes(run_dir)

    def must_not_train(*args: object) -> None:
        raise AssertionError("training started in a run directory it cannot write")

    monkeypatch.setattr(train_stage, "_train", must_not_train)
    with _read_only(run_dir) as meaning:
        code, out, err = _invoke("train", str(run_dir), "--quiet", "--force")
        assert code == 1 and out == ""
        line = _one_error_line(err)
        assert str(run_dir) in line and meaning in line
        code, out, err = _invoke("metrics", str(run_dir), "--json")
        assert code == 0
        assert json.loads(out)["mean"]
        assert "warning: results not saved" in err and meaning in err
    assert _hashes(run_dir) == before


def test_an_output_directory_that_cannot_be_written_is_one_line(data: Path, tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    with _read_only(parent) as meaning:
        code, _out, err = _invoke("extract", str(data), "--shots", "1", "-o", str(parent / "run"), *TINY)
        assert code == 1
        line = _one_error_line(err)
        assert str(parent / "run") in line and meaning in line


def test_write_failure_names_the_file_and_the_errno_meaning() -> None:
    h5py_message = RuntimeError(
        "Unable to synchronously flush file (file write failed: time = x, filename = '/r/scores.h5.tmp', "
        "file descriptor = 3, errno = 28, error message = 'No space left on device', buf = 0x1)"
    )
    assert str(write_failure(h5py_message)) == "/r/scores.h5.tmp: cannot write: no space left on device (ENOSPC); free some space and rerun"
    assert str(write_failure(h5py_message, "/r/scores.h5")).startswith("/r/scores.h5: cannot write")
    assert "EDQUOT" in str(write_failure(OSError(122, "Disk quota exceeded", "/r/x")))
    assert "read-only file system (EROFS)" in str(write_failure(OSError(30, "Read-only file system", "/r/x")))
    safetensors_message = Exception("Error while serializing: No space left on device (os error 28)")
    assert str(write_failure(safetensors_message, "/r/b")).startswith("/r/b: cannot write: no space left on device (ENOSPC)")
    assert write_failure(OSError(2, "No such file or directory", "/r/x")) is None
    assert write_failure(RuntimeError("shapes do not match")) is None


# --- artifacts checked both ways ------------------------------------------------------------------


def _edit_banks(run_dir: Path, edit) -> None:
    from safetensors import safe_open

    path = run_dir / BANKS_FILE
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    edit(tensors)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update(extra=torch.zeros(1)), "has unexpected extra"),
        (lambda t: t.pop("prompt"), "lacks prompt"),
        (lambda t: t.update(query=t["query"].double()), "query is float64, a valid banks file stores float32"),
        (lambda t: t.update(prompt=t["prompt"][:, :1]), "prompt has shape"),
        (lambda t: t.update(prompt=t["prompt"][:1]), "axis 0 should be"),
    ],
)
def test_banks_are_checked_both_ways(complete_run: Path, tmp_path: Path, edit, message: str) -> None:
    run_dir = _copy(complete_run, tmp_path / "run")
    load_banks(run_dir / BANKS_FILE)
    _edit_banks(run_dir, edit)
    with pytest.raises(IipadError, match=message):
        load_banks(run_dir / BANKS_FILE)
    code, _out, err = _invoke("score", str(run_dir), "--quiet", "--device", "cpu")
    assert code == 1 and message.split()[0] in _one_error_line(err)


def test_generator_dtype_is_checked(complete_run: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    path = _copy(complete_run, tmp_path / "run") / GENERATOR_FILE
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].double()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(IipadError, match=f"{name} is float64"):
        load_generator(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h["test"].create_dataset("extra", data=np.zeros(3)), "has unexpected extra"),
        (lambda h: h["train"].__delitem__("qformer"), "lacks qformer"),
        (lambda h: h.create_group("more"), "groups"),
    ],
)
def test_features_are_checked_both_ways(complete_run: Path, tmp_path: Path, edit, message: str) -> None:
    path = _copy(complete_run, tmp_path / "run") / FEATURES_FILE
    with h5py.File(path, "a") as handle:
        edit(handle)
    with pytest.raises(IipadError, match=message):
        load_features_attrs(path)


def test_features_dtype_is_checked(complete_run: Path, tmp_path: Path) -> None:
    path = _copy(complete_run, tmp_path / "run") / FEATURES_FILE
    with h5py.File(path, "a") as handle:
        values = handle["test"]["vv"][...]
        del handle["test"]["vv"]
        handle["test"].create_dataset("vv", data=values.astype(np.float32))
    with pytest.raises(IipadError, match="vv is float32, a valid features file stores float16"):
        load_features_attrs(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.create_dataset("extra", data=np.zeros(3)), "has unexpected extra"),
        (lambda h: h.__delitem__("p_normal"), "lacks p_normal"),
        (lambda h: h.attrs.__setitem__("top_k", 99), "retrieved has shape"),
    ],
)
def test_scores_are_checked_both_ways(complete_run: Path, tmp_path: Path, edit, message: str) -> None:
    run_dir = _copy(complete_run, tmp_path / "run")
    with h5py.File(run_dir / SCORES_FILE, "a") as handle:
        edit(handle)
    with pytest.raises(IipadError, match=message):
        read_scores_attrs(run_dir / SCORES_FILE)
    code, _out, err = _invoke("metrics", str(run_dir), "--json")
    assert code == 1 and message.split()[0] in _one_error_line(err)
