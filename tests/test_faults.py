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
    """extract -> train (1 epoch) -> bank -> score on two generated classes.

    A self-contained features.h5 (--copy): tests edit copies of it, which must not write through
    into the shared feature store."""
    run_dir = tmp_path_factory.mktemp("faults-run") / "run"
    steps = [
        ("extract", str(data), "--shots", "1", "--classes", "wood,weave", "--workers", "0", "-o", str(run_dir), "--copy"),
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
    # A self-contained copy (--copy) on the small file system, beside its feature store.
    run_dir, cache = (small_fs or tmp_path) / "run", (small_fs or tmp_path) / "store"
    limit = None if small_fs is not None else 64 << 10  # below the file's size
    args = ["--shots", "1", "-o", str(run_dir), "--cache", str(cache), "--copy"]
    result = _cli("extract", str(data), *args, *TINY, limit_bytes=limit)
    assert result.returncode == 1, result.stderr  # not 139 (h5py's segfault) and no traceback
    line = _one_error_line(result.stderr)
    assert "features.h5: needs about" in line
    assert not list(cache.rglob("*.h5"))  # refused before any image was encoded
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
import iipad_cli.store.writer as writer
import iipad_cli.stages.extract as extract

# Let the checks before the work pass, then take the space (or lower the limit) as if another
# process had done it during the run: the HDF5 write of a feature store segment itself fails.
extract.require_space = lambda path, needed: None
original = writer.StoreWriter.add
def add(self, contents, features):
    if self._contents:
        segment = self._paths()[0]
        if {limit}:
            resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(segment), resource.RLIM_INFINITY))
        else:
            fd = os.open(self.store.root.parent / "ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            for size in (1 << 20, 4096, 1):
                try:
                    while True:
                        os.write(fd, b"\\0" * size)
                except OSError:
                    pass
            os.close(fd)
    return original(self, contents, features)
writer.StoreWriter.add = add
"""


def test_a_write_that_fails_inside_hdf5_is_one_line_not_a_segfault(data: Path, small_fs: Path | None, tmp_path: Path) -> None:
    if small_fs is not None:
        subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    run_dir, cache = (small_fs or tmp_path) / "run", (small_fs or tmp_path) / "store"
    prelude = WRITE_FAILS_MID_FILE.replace("{limit}", str(small_fs is None))
    args = ["--shots", "1", "--workers", "0", "-o", str(run_dir), "--cache", str(cache)]
    result = _cli("extract", str(data), *args, "--batch-size", "2", *TINY, prelude=prelude)
    assert result.returncode == 1, f"{result.returncode}: {result.stderr[-2000:]}"
    line = _one_error_line(result.stderr)
    assert ".h5.tmp: cannot write:" in line and str(cache) in line
    assert ("ENOSPC" in line) if small_fs is not None else ("EFBIG" in line)
    assert _leftovers(run_dir) == [] and _leftovers(cache) == []
    if small_fs is not None:
        # The way out the message names works: with space again, a rerun finishes the file.
        (small_fs / "ballast").unlink()
        result = _cli("extract", str(data), *args, *TINY)
        assert result.returncode == 0, result.stderr
        assert load_features_attrs(run_dir / FEATURES_FILE)["complete"]


LIMIT_BEFORE_WORKERS = """
import resource
import iipad_cli.stages.encoding as encoding
original = encoding.DataLoader
def loader(*args, **kwargs):
    # `ulimit -f` that the features file fits under but a batch in /dev/shm does not.
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    return original(*args, **kwargs)
encoding.DataLoader = loader
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
import iipad_cli.stages.encoding as encoding
from torch.utils.data import get_worker_info
original = encoding.preprocess_image
def preprocess(path, size):
    if get_worker_info() is not None:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return original(path, size)
encoding.preprocess_image = preprocess
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


# --- exit codes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["extract", "{data}", "--shots", "0"], "--shots must be at least 1"),
        (["extract", "{data}", "--shots", "1", "--layout", "bogus"], "--layout must be auto, mvtec, visa or folder"),
        (["extract", "{data}", "--shots", "1", "--shot-policy", "best"], "--shot-policy must be random or official"),
        (["extract", "{data}", "--shots", "1", "--backbone", "vit-b"], "--backbone must be"),
        (["extract", "{data}", "--shots", "1", "--device", "gpu"], "--device must be auto, cpu"),
        (["train", "{run}", "--preset", "bogus"], "--preset must be official or paper"),
        (["train", "{run}", "--epochs", "0"], "--epochs must be at least 1"),
        (["score", "{run}", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["metrics", "{run}", "--json", "--csv"], "choose one of --table, --json, --csv"),
        (["metrics", "{run}", "--pro-limit", "2"], "--pro-limit must be in (0, 1]"),
        (["metrics"], "give at least one run directory"),
        (["run", "{data}", "--shots", "1", "--seeds", "1,1"], "--seeds has repeated values"),
    ],
)
def test_usage_errors_exit_2_before_any_work(args: list[str], message: str, data: Path, complete_run: Path, tmp_path: Path) -> None:
    before = _hashes(complete_run)
    filled = [a.replace("{data}", str(data)).replace("{run}", str(complete_run)) for a in args]
    code, out, err = _invoke(*filled, *(["-o", str(tmp_path / "new")] if args[0] in ("extract", "run") else []))
    assert code == 2, err
    assert message in _one_error_line(err) and out == ""
    assert not (tmp_path / "new").exists() and _hashes(complete_run) == before


def test_a_missing_argument_exits_2(tmp_path: Path) -> None:
    result = _cli("extract", "--shots", "1")
    assert result.returncode == 2 and "Missing argument" in result.stderr


def test_a_runtime_error_exits_1(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _out, err = _invoke("extract", str(tmp_path / "empty"), "--shots", "1", *TINY, "-o", str(tmp_path / "run"))
    assert code == 1 and _one_error_line(err)


def test_ctrl_c_exits_130_and_rerunning_resumes(data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["extract", str(data), "--shots", "1", "--batch-size", "1", "--workers", "0", "-o", str(run_dir), "--backbone", "tiny", "--device", "cpu"]
    marker = tmp_path / "two-stored"
    # Decoding the third image (two are stored: batch size 1, no workers) leaves a mark and waits.
    slow = (
        "import time, pathlib, iipad_cli.stages.encoding as e\n"
        "o = e.preprocess_image\ncalls = []\n"
        "def slow(*a):\n"
        "    calls.append(1)\n"
        f"    if len(calls) == 3:\n        pathlib.Path({str(marker)!r}).touch()\n        time.sleep(60)\n"
        "    return o(*a)\n"
        "e.preprocess_image = slow\n"
    )
    # A shell that starts a job in the background without job control (as CI runners may) makes
    # the job ignore SIGINT, and the child would inherit that: restore what a terminal's Ctrl-C meets.
    restore_ctrl_c = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
    code = f"import sys\n{restore_ctrl_c}{slow}\nfrom iipad_cli.cli import main\nsys.argv = ['iipad', *sys.argv[1:]]\nmain()\n"
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 120
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err and out == ""
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    # The two images encoded before the interruption were sealed into the feature store.
    assert "15 distinct images: 2 in the feature store" in result.stderr
    assert load_features_attrs(run_dir / FEATURES_FILE)["complete"]


# --- metrics: which runs may be averaged -------------------------------------------------------------


@pytest.fixture(scope="module")
def two_shot_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults-two-shot") / "run"
    for step in (
        ("extract", str(data), "--shots", "2", "--classes", "wood,weave", "--workers", "0", "-o", str(run_dir), *TINY),
        ("train", str(run_dir), "--epochs", "1", "--device", "cpu", "--quiet"),
        ("bank", str(run_dir), "--device", "cpu", "--quiet"),
        ("score", str(run_dir), "--device", "cpu", "--quiet"),
    ):
        code, _out, err = _invoke(*step)
        assert code == 0, err
    return run_dir


def test_metrics_refuses_a_run_given_twice(complete_run: Path, tmp_path: Path) -> None:
    code, out, err = _invoke("metrics", str(complete_run), str(complete_run) + "/", "--json")
    assert code == 2 and out == "" and "given twice" in _one_error_line(err)
    copy = _copy(complete_run, tmp_path / "copy")
    code, out, err = _invoke("metrics", str(complete_run), str(copy), "--json")
    assert code == 2 and out == "" and "holds the same scores as" in _one_error_line(err)


def test_metrics_refuses_runs_of_different_k(complete_run: Path, two_shot_run: Path) -> None:
    code, out, err = _invoke("metrics", str(complete_run), str(two_shot_run), "--json")
    assert code == 1 and out == ""
    line = _one_error_line(err)
    assert f"{two_shot_run}: shots 2 differs from {complete_run}'s 1" in line


def test_metrics_refuses_runs_of_different_presets(complete_run: Path, tmp_path: Path) -> None:
    other = _copy(complete_run, tmp_path / "paper")
    for step in (("train", str(other), "--preset", "paper", "--epochs", "1", "--force"), ("bank", str(other)), ("score", str(other))):
        code, _out, err = _invoke(*step, "--device", "cpu", "--quiet")
        assert code == 0, err
    code, out, err = _invoke("metrics", str(complete_run), str(other), "--json")
    assert code == 1 and "preset 'paper' differs from" in _one_error_line(err)


def test_metrics_averages_runs_that_differ_only_in_the_seed(data: Path, complete_run: Path, tmp_path: Path) -> None:
    other = _copy(complete_run, tmp_path / "seed1")
    for step in (("train", str(other), "--seed", "1", "--epochs", "1", "--force"), ("bank", str(other)), ("score", str(other))):
        code, _out, err = _invoke(*step, "--device", "cpu", "--quiet")
        assert code == 0, err
    code, out, err = _invoke("metrics", str(complete_run), str(other), "--json")
    assert code == 0, err
    assert json.loads(out)["runs"] == [str(complete_run.resolve()), str(other.resolve())]


# --- pipes that survive any path ---------------------------------------------------------------------

SHIM = """
iipad() {
  case "$1" in
    extract) python -m iipad_cli.cli "$@" --backbone tiny --workers 0 --device cpu ;;
    train) python -m iipad_cli.cli "$@" --epochs 1 --device cpu ;;
    metrics) python -m iipad_cli.cli "$@" ;;
    *) python -m iipad_cli.cli "$@" --device cpu ;;
  esac
}
"""


def _readme_loop() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("```bash\nset -o pipefail")
    return text[start + len("```bash\n") : text.index("```", start + 8)]


def test_the_readme_loop_runs_as_written(data: Path, tmp_path: Path) -> None:
    """The README's shell loop, with `iipad` pointing at this checkout (tiny backbone, one epoch)
    and, to keep the test short, one shot count and two draws instead of 1 2 4 and 0 1 2."""
    loop = _readme_loop()
    assert "| iipad train" in loop and "xargs" not in loop
    shortened = loop.replace("for k in 1 2 4", "for k in 1").replace("for seed in 0 1 2", "for seed in 0 1").replace("{0,1,2}", "{0,1}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mvtec").symlink_to(data)
    result = subprocess.run(
        ["bash", "-e", "-c", SHIM + shortened], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / "results" / "mvtec-1shot.csv").read_text().splitlines()
    assert rows[0].startswith("class,") and any(row.startswith("mean,") for row in rows)


def test_pipes_survive_spaces_unicode_and_a_leading_dash(data: Path, tmp_path: Path) -> None:
    script = SHIM + (
        'iipad extract "$DATA" --shots 1 --classes wood -o "-my run ü" -q | tee printed '
        "| iipad train -q | iipad bank -q | iipad score -q > /dev/null\n"
    )
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "DATA": str(data)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "printed").read_text() == "./-my run ü\n"
    assert read_scores_attrs(tmp_path / "-my run ü" / SCORES_FILE)["complete"]


def test_a_stage_without_run_and_without_a_pipe_is_a_usage_error() -> None:
    result = _cli("train", "--quiet")  # stdin: the test runner's, not a pipe with a path
    assert result.returncode == 2 and "missing argument RUN" in result.stderr


# --- every hint works as printed ----------------------------------------------------------------------


def _hint(line: str) -> list[str]:
    """The command in backticks of an error line, as argv without `iipad`."""
    import shlex

    command = line.split("`")[1]
    argv = shlex.split(command)
    assert argv[0] == "iipad"
    return argv[1:]


def _follow(line: str) -> None:
    code, _out, err = _invoke(*_hint(line), "--quiet", "--device", "cpu", "--workers", "0")
    assert code == 0, err


def test_nan_features_hint_rebuilds_them(complete_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(complete_run, tmp_path / "run")
    with h5py.File(run_dir / FEATURES_FILE, "a") as handle:
        handle["train"]["vv"][0, 0, 0, 0] = np.nan
    code, _out, err = _invoke("train", str(run_dir), "--force", "--epochs", "1", "--quiet", "--device", "cpu")
    line = _one_error_line(err)
    assert code == 1 and "NaN" in line and "--force`" in line
    # As the run was made: its precision, and a self-contained file (--copy) again.
    assert "--precision fp32" in line and "--copy" in line
    _follow(line)
    assert not load_features_attrs(run_dir / FEATURES_FILE)["virtual"]
    code, _out, err = _invoke("train", str(run_dir), "--force", "--epochs", "1", "--quiet", "--device", "cpu")
    assert code == 0, err


def test_nan_test_features_hint_in_score_rebuilds_them(complete_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(complete_run, tmp_path / "run")
    with h5py.File(run_dir / FEATURES_FILE, "a") as handle:
        handle["test"]["mem"][1, 0, 0, 0] = np.inf
    code, _out, err = _invoke("score", str(run_dir), "--quiet", "--device", "cpu", "--force")
    line = _one_error_line(err)
    assert code == 1 and "NaN or Inf" in line
    _follow(line)
    for stage in ("train", "bank", "score"):
        code, _out, err = _invoke(stage, str(run_dir), "--quiet", "--device", "cpu", *(["--force", "--epochs", "1"] if stage == "train" else []))
        assert code == 0, f"{stage}: {err}"


def test_truncated_features_hint_rebuilds_them(complete_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(complete_run, tmp_path / "-dash run")
    path = run_dir / FEATURES_FILE
    os.truncate(path, path.stat().st_size // 2)
    code, _out, err = _invoke("train", str(run_dir), "--quiet", "--device", "cpu")
    line = _one_error_line(err)
    assert code == 1 and "not a readable features file" in line and "-o " in line
    _follow(line)
    assert load_features_attrs(path)["complete"]


def test_unreadable_features_without_a_manifest_is_one_line(complete_run: Path, tmp_path: Path) -> None:
    """The hint falls back to the features file's attributes when the manifest is gone; with the
    file unreadable too, building the hint used to recurse until Python gave up."""
    run_dir = _copy(complete_run, tmp_path / "run")
    (run_dir / "manifest.json").unlink()
    path = run_dir / FEATURES_FILE
    os.truncate(path, path.stat().st_size // 2)
    code, _out, err = _invoke("train", str(run_dir), "--quiet", "--device", "cpu")
    line = _one_error_line(err)
    assert code == 1 and "not a readable features file" in line
    assert f"`iipad extract DATA --shots K -o {run_dir} --force`" in line


def test_a_changed_file_list_is_named_and_force_extracts_again(data: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    run_dir = tmp_path / "run"
    args = ["extract", str(copy), "--shots", "1", "--classes", "wood", "--workers", "0", "-o", str(run_dir), *TINY]
    assert _invoke(*args)[0] == 0
    removed = sorted((copy / "wood" / "test" / "good").iterdir())[0]
    removed.unlink()
    code, _out, err = _invoke(*args)
    line = _one_error_line(err)
    assert code == 1 and "the file list changed: 1 removed (wood/test/good/" in line and "pass --force" in line
    assert _invoke(*args, "--force")[0] == 0
    assert load_features_attrs(run_dir / FEATURES_FILE)["num_test"] == 3


def test_a_bank_from_another_generator_hint_rebuilds_it(complete_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(complete_run, tmp_path / "run")
    code, _out, err = _invoke("train", str(run_dir), "--force", "--epochs", "1", "--seed", "5", "--quiet", "--device", "cpu")
    assert code == 0, err
    code, _out, err = _invoke("score", str(run_dir), "--quiet", "--device", "cpu")
    line = _one_error_line(err)
    assert code == 1 and f"re-run `iipad bank {run_dir}`" in line
    code, _out, err = _invoke(*_hint(line), "--quiet", "--device", "cpu")
    assert code == 0, err
    code, _out, err = _invoke("score", str(run_dir), "--quiet", "--device", "cpu")
    assert code == 0, err
