"""torchrun support (iipad_cli/distributed.py): the launch variables, the deterministic shards, the
refusal of single-process commands, the collectives across two real gloo processes, and
`iipad predict` under `torchrun --standalone --nproc-per-node 2` equal to one process.

The multi-process tests start real processes with the venv's `torchrun` (one CPU thread per rank,
OMP_NUM_THREADS=1) and a timeout, so a broken rendezvous fails instead of hanging.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from iipad_cli.cli import app
from iipad_cli.distributed import (
    DISTRIBUTED_COMMANDS,
    Group,
    Launch,
    UsageError,
    check_command,
    launch_from_env,
    shard_range,
)
from iipad_cli.errors import IipadError

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Generous: two ranks plus their torch imports share a loaded 2-core machine.
PROCESS_TIMEOUT_S = 600


def _tool(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{path} not found: install the package into this venv (pip install -e '.[test]')")
    return str(path)


def _env(**extra: str) -> dict[str, str]:
    """This checkout first on the path (the venv's editable install may point at another one), one
    CPU thread per process, and no launch variables inherited from a surrounding torchrun."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=_env(**env), capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, cwd=REPO_ROOT
    )


def _torchrun(nproc: int, *command: str) -> list[str]:
    return [_tool("torchrun"), "--standalone", "--nproc-per-node", str(nproc), *command]


# --- launch variables -------------------------------------------------------------------------


def test_no_launch_variables_is_a_world_of_one() -> None:
    assert launch_from_env({}) == Launch(rank=0, world_size=1, local_rank=0, local_world_size=1)
    assert not launch_from_env({}).distributed and launch_from_env({}).is_main


def test_launch_reads_torchruns_variables() -> None:
    launch = launch_from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert launch == Launch(rank=5, world_size=8, local_rank=1, local_world_size=4, node=1)
    assert launch.distributed and not launch.is_main
    # One node: LOCAL_* default to the global values.
    assert launch_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Launch(1, 2, 1, 2, 0)
    # torchrun's GROUP_RANK names the node (agent) when ranks are not numbered node by node.
    assert launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1", "GROUP_RANK": "0"}).node == 0


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK=-1"),
        ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "2"}, "LOCAL_RANK=2"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE=3"),
    ],
)
def test_inconsistent_launch_variables_are_one_line_errors(environ: dict[str, str], named: str) -> None:
    with pytest.raises(IipadError) as raised:
        launch_from_env(environ)
    assert named in str(raised.value) and "\n" not in str(raised.value)


# --- shards -----------------------------------------------------------------------------------


def test_shards_written_out() -> None:
    # 10 items in batches of 3: [0,3) [3,6) [6,9) [9,10); two ranks take two batches each.
    assert [shard_range(10, 3, rank, 2) for rank in range(2)] == [range(0, 6), range(6, 10)]
    # Three ranks, four batches: 1, 1, 2 batches (floor(4*r/3) boundaries 0, 1, 2, 4).
    assert [shard_range(10, 3, rank, 3) for rank in range(3)] == [range(0, 3), range(3, 6), range(6, 10)]
    # More ranks than batches: some ranks get nothing.
    assert [shard_range(2, 8, rank, 3) for rank in range(3)] == [range(0, 0), range(0, 0), range(0, 2)]
    assert [len(shard_range(0, 4, rank, 2)) for rank in range(2)] == [0, 0]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_shards_are_disjoint_ordered_whole_batches(world_size: int, batch_size: int) -> None:
    for count in range(0, 40):
        shards = [shard_range(count, batch_size, rank, world_size) for rank in range(world_size)]
        # In rank order, the shards concatenate to the whole list, each position once.
        assert [i for shard in shards for i in shard] == list(range(count))
        # The batches one process forms: the same cut points.
        single = [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
        per_rank = [
            [list(range(start, min(start + batch_size, shard.stop))) for start in range(shard.start, shard.stop, batch_size)]
            for shard in shards
        ]
        assert [batch for batches in per_rank for batch in batches] == single
        # Balanced to within one batch.
        sizes = [len(batches) for batches in per_rank]
        assert max(sizes) - min(sizes) <= 1


def test_shard_rejects_impossible_arguments() -> None:
    with pytest.raises(ValueError):
        shard_range(10, 0, 0, 1)
    with pytest.raises(ValueError):
        shard_range(10, 2, 2, 2)


# --- commands that refuse ---------------------------------------------------------------------


def test_only_extract_and_predict_run_across_ranks() -> None:
    two = Launch(rank=0, world_size=2, local_rank=0, local_world_size=2)
    for command in ("extract", "predict"):
        check_command(command, two)
    for command in ("train", "bank", "score", "metrics", "run", "demo", "weights", "cache"):
        assert command not in DISTRIBUTED_COMMANDS
        with pytest.raises(UsageError, match=f"iipad {command} runs in one process.*WORLD_SIZE=2"):
            check_command(command, two)
        check_command(command, Launch())


@pytest.mark.parametrize("command", ["train", "bank", "score", "metrics"])
def test_cli_refuses_single_process_stages_under_torchrun(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, [command, str(tmp_path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"iipad {command} runs in one process" in lines[0]
    assert list(tmp_path.iterdir()) == []
    # The other ranks exit the same way without repeating the line.
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(app, [command, str(tmp_path)])
    assert result.exit_code == 2 and result.stderr == ""


def test_cli_reports_bad_launch_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    result = CliRunner().invoke(app, ["metrics", str(tmp_path)])
    assert result.exit_code == 1 and "RANK='x' is not an integer" in result.stderr


# --- collectives ------------------------------------------------------------------------------


def test_world_of_one_collectives_are_local() -> None:
    group = Group(Launch())
    assert group.gather(3) == [3]
    assert group.from_main(lambda: "listing") == "listing"
    assert group.collectively(lambda: 7) == 7
    with pytest.raises(IipadError, match="^bad image$"):
        group.collectively(lambda: (_ for _ in ()).throw(IipadError("bad image")))


COLLECTIVES_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import torch
    from iipad_cli.distributed import launch_from_env, process_group, rank_device, stop_between_batches
    from iipad_cli.errors import IipadError

    launch = launch_from_env()
    report = {"launch": [launch.rank, launch.world_size, launch.local_rank, launch.local_world_size]}
    with process_group(launch, rank_device("cpu", launch)) as group:
        report["backend"] = torch.distributed.get_backend()
        report["gather"] = group.gather(launch.rank * 10)
        report["from_main"] = group.from_main(lambda: ["a.png", "b.png", f"made by {launch.rank}"])
        def fails_on_rank_1():
            if launch.rank == 1:
                raise IipadError("image x.png is truncated")
            return "fine"
        try:
            group.collectively(fails_on_rank_1)
        except IipadError as error:
            report["collective_error"] = str(error)
        try:
            group.from_main(lambda: (_ for _ in ()).throw(IipadError("no images in in/")))
        except IipadError as error:
            report["main_error"] = str(error)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # how torchrun stops the survivors of a failed group
            time.sleep(30)
        except SystemExit as stop:
            report["sigterm_exit"] = stop.code
        with stop_between_batches(launch) as check:
            os.kill(os.getpid(), signal.SIGTERM)
            report["held_until_check"] = True  # still running: the signal waits for the boundary
            try:
                check()
            except SystemExit as stop:
                report["stopped_at_check"] = stop.code
        out = sys.argv[1]
        with open(os.path.join(out, f"rank{launch.rank}.json"), "w") as handle:
            json.dump(report, handle)
        if launch.rank == 1:
            os._exit(0)  # leave without a word: rank 0 is waiting at a collective
        try:
            group.barrier()
        except IipadError as error:
            with open(os.path.join(out, "lost.txt"), "w") as handle:
                handle.write(str(error))
            os._exit(0)
    """
)


def test_collectives_across_two_processes(tmp_path: Path) -> None:
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES_SCRIPT)
    result = _run(_torchrun(2, str(script), str(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, report in enumerate(reports):
        assert report["launch"] == [rank, 2, rank, 2]
        assert report["backend"] == "gloo"
        assert report["gather"] == [0, 10]
        assert report["from_main"] == ["a.png", "b.png", "made by 0"]
        assert report["collective_error"] == "rank 1 of 2: image x.png is truncated"
        assert report["main_error"] == "no images in in/"
        # SIGTERM unwinds through `with`/`finally` (so store segments get sealed) instead of killing.
        assert report["sigterm_exit"] == 143
        # Held while a rank encodes, it ends the rank at the next batch boundary instead.
        assert report["held_until_check"] and report["stopped_at_check"] == 143
    lost = (tmp_path / "lost.txt").read_text()
    assert lost.startswith("rank 0 of 2: lost contact with another rank") and "\n" not in lost


# --- predict under torchrun -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """bottle + tire, 1 shot each, `tiny` (random weights), one training epoch, banks, scores (and
    with them the label-free thresholds that predict decides with)."""
    run_dir = tmp_path_factory.mktemp("dist") / "run"
    steps = [
        ["extract", str(shared_data / "mvtec"), "--shots", "1", "--backbone", "tiny", "--classes", "bottle,tire",
         "--workers", "0", "-o", str(run_dir)],
        ["train", str(run_dir), "--epochs", "1"],
        ["bank", str(run_dir)],
        ["score", str(run_dir)],
    ]
    for step in steps:
        result = CliRunner().invoke(app, [*step, "--quiet", "--device", "cpu"])
        assert result.exit_code == 0, f"{step[0]} failed: {result.stderr}"
    return run_dir


def _predict_command(run_dir: Path, inputs: list[str], out: Path) -> list[str]:
    return [_tool("iipad"), "predict", str(run_dir), *inputs, "-o", str(out), "--batch-size", "4", "--device", "cpu", "--quiet"]


def test_predict_under_torchrun_equals_one_process(trained_run: Path, shared_data: Path, tmp_path: Path) -> None:
    from PIL import Image

    corrupt = tmp_path / "in" / "zz_corrupt.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    # An image the store does not hold (one pixel changed): encoded, and not kept without --cache.
    fresh = tmp_path / "in" / "zz_fresh.png"
    image = Image.open(shared_data / "mvtec" / "tire" / "test" / "good" / "000.png").convert("RGB")
    image.putpixel((0, 0), (1, 2, 3))
    image.save(fresh)
    inputs = [str(shared_data / "mvtec" / "bottle" / "test"), str(shared_data / "mvtec" / "tire" / "test"), str(corrupt), str(fresh)]
    cache = Path(os.environ["IIPAD_CACHE"])
    stored_before = _verified(cache)

    single = _run(_predict_command(trained_run, inputs, tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    ranks = _run(_torchrun(2, "--no-python", *_predict_command(trained_run, inputs, tmp_path / "two")))
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    # Only rank 0 prints the result.
    assert ranks.stdout.strip() == str(tmp_path / "two" / "predictions.csv")
    assert single.stdout.strip() == str(tmp_path / "single" / "predictions.csv")

    one_csv = (tmp_path / "single" / "predictions.csv").read_text()
    two_csv = (tmp_path / "two" / "predictions.csv").read_text()
    assert two_csv == one_csv
    with (tmp_path / "two" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    # Input order: bottle's test images sorted, then tire's; the corrupt image skipped, once.
    expected = [
        str(p)
        for folder in ("bottle", "tire")
        for p in sorted(q for q in (shared_data / "mvtec" / folder / "test").rglob("*.png"))
    ] + [str(fresh)]
    assert [row["path"] for row in rows] == expected
    assert ranks.stderr.count("skipped:") == 1 and "zz_corrupt.png" in ranks.stderr

    # The same maps, file for file, and no part files left behind.
    one_files = sorted(p.name for p in (tmp_path / "single").iterdir())
    two_files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert two_files == one_files
    assert not any(".part-" in name for name in two_files)
    for name in one_files:
        if name.endswith(".npy"):
            assert np.array_equal(np.load(tmp_path / "single" / name), np.load(tmp_path / "two" / name)), name

    record = json.loads((tmp_path / "two" / "predict.json").read_text())
    assert record["world_size"] == 2 and record["scored"] == len(expected)
    assert [r["rank"] for r in record["ranks"]] == [0, 1]
    assert sum(r["scored"] for r in record["ranks"]) == len(expected) and all(r["scored"] > 0 for r in record["ranks"])
    assert record["skipped"] == [str(corrupt)]
    # Streaming: nothing was added to the feature store (no --cache).
    assert _verified(cache) == stored_before


def test_train_under_torchrun_is_refused_once(trained_run: Path) -> None:
    result = _run(_torchrun(2, "--no-python", _tool("iipad"), "train", str(trained_run), "--quiet"))
    assert result.returncode != 0
    assert result.stderr.count("iipad train runs in one process") == 1


# --- extract under torchrun -------------------------------------------------------------------


def _datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a features file (read through the virtual datasets) and its root attributes."""
    import h5py

    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, item: found.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return found


def _extract_command(data: Path, run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [_tool("iipad"), "extract", str(data), "--shots", "1", "--backbone", "tiny", "--device", "cpu",
            "--workers", "0", "--cache", str(cache), "-o", str(run_dir), *extra]


def _extract_entry(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]["extract"]


def _assert_same_features(first: Path, second: Path) -> None:
    one, two = _datasets(first), _datasets(second)
    assert one.keys() == two.keys()
    for key in one:
        assert np.array_equal(one[key], two[key]), key


def _verified(cache: Path) -> int:
    """Images indexed in the store at `cache`, after checking it verifies."""
    from iipad_cli.store import FeatureStore

    with FeatureStore(cache) as store:
        report = store.verify()
        assert report.ok, report.problems
        return sum(backbone.images for backbone in store.info().backbones)


def _on_two_nodes(command: list[str], **env: str) -> list[subprocess.CompletedProcess[str]]:
    """`command` under two torchrun agents of one rank each meeting at a c10d rendezvous: two
    "nodes" (GROUP_RANK 0 and 1) on this host."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent = [_tool("torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "iipad-two-nodes", "--no-python", *command]
    agents = [subprocess.Popen(agent, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
              for _ in range(2)]
    try:
        outputs = [a.communicate(timeout=PROCESS_TIMEOUT_S) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    return [subprocess.CompletedProcess(agent, a.returncode, out, err) for a, (out, err) in zip(agents, outputs)]


def test_extract_under_torchrun_equals_one_process(shared_data: Path, tmp_path: Path) -> None:
    data = shared_data / "mvtec"
    classes = ("--classes", "bottle,tire", "--batch-size", "4")
    single = _run(_extract_command(data, tmp_path / "one", tmp_path / "cache-one", *classes))
    assert single.returncode == 0, single.stderr
    command = _torchrun(2, "--no-python", *_extract_command(data, tmp_path / "two", tmp_path / "cache-two", *classes))
    ranks = _run(command)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout.strip() == str(tmp_path / "two")

    # Same batches on the same kind of device: the same features, bit for bit, and the same file.
    _assert_same_features(tmp_path / "one" / "features.h5", tmp_path / "two" / "features.h5")
    one, two = _extract_entry(tmp_path / "one"), _extract_entry(tmp_path / "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["images_encoded"] == one["images_encoded"] > 0 and two["images_from_store"] == 0
    assert [r["rank"] for r in two["ranks"]] == [0, 1] and all(r["images_encoded"] > 0 for r in two["ranks"])
    assert sum(r["images_encoded"] for r in two["ranks"]) == two["images_encoded"]
    # The same recorded options (only the store's location differs here), so `iipad run` finds the
    # distributed extract current.
    assert {k: v for k, v in two["options"].items() if k != "cache"} == {k: v for k, v in one["options"].items() if k != "cache"}
    # Each rank sealed its own segment; the store verifies and holds each image once.
    assert _verified(tmp_path / "cache-two") == two["images_encoded"]
    assert len(list((tmp_path / "cache-two").rglob("*.h5"))) == 2

    # The same command again: nothing to encode, nothing rewritten.
    before = (tmp_path / "two" / "features.h5").stat().st_mtime_ns
    again = _run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "two" / "features.h5").stat().st_mtime_ns == before

    # Two nodes (two torchrun agents, one rank each, meeting at a c10d rendezvous): the rank on the
    # other node never opens the store's SQLite index (WAL needs one host); rank 0 indexes its
    # sealed segments. Same features again.
    agents = _on_two_nodes(_extract_command(data, tmp_path / "nodes", tmp_path / "cache-nodes", *classes))
    assert [a.returncode for a in agents] == [0, 0], agents[0].stderr[-2000:] + agents[1].stderr[-2000:]
    assert sorted(a.stdout.strip() for a in agents) == ["", str(tmp_path / "nodes")]
    _assert_same_features(tmp_path / "one" / "features.h5", tmp_path / "nodes" / "features.h5")
    nodes = _extract_entry(tmp_path / "nodes")
    assert [r["segments_indexed_by_rank_0"] for r in nodes["ranks"]] == [0, 1]
    assert _verified(tmp_path / "cache-nodes") == nodes["images_encoded"] == one["images_encoded"]


def test_extract_under_torchrun_is_refused_while_another_process_writes_the_run(shared_data: Path, tmp_path: Path) -> None:
    """Rank 0 takes the run directory's lock for every rank (runlock.py): with another writer
    holding it, every rank stops with its one-line error and the holder's work is untouched."""
    run_dir = tmp_path / "run"
    hold = "import sys, time\nfrom pathlib import Path\nfrom iipad_cli.runlock import run_lock\n" \
        "with run_lock(Path(sys.argv[1]), 'extract'):\n    print('locked', flush=True)\n    time.sleep(300)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        partial = run_dir / "features.h5.partial"
        partial.write_bytes(b"being written by the holder")
        command = _extract_command(shared_data / "mvtec", run_dir, tmp_path / "cache", "--classes", "bottle")
        result = _run(_torchrun(2, "--no-python", *command))
        assert result.returncode != 0 and result.stdout == ""
        refusals = [line for line in result.stderr.splitlines() if f"{run_dir} is in use by pid {holder.pid}" in line]
        assert len(refusals) == 2, result.stderr[-3000:]
        assert partial.read_bytes() == b"being written by the holder"
        assert not (run_dir / "features.h5").exists()
    finally:
        holder.kill()
        holder.wait()


def _make_folder_data(root: Path, images: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(7)
    for split, count in (("train", 2), ("test", images)):
        folder = root / "part" / split / "good"
        folder.mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)).save(folder / f"{index:04d}.png")
    return root


def test_a_failing_rank_on_another_node_keeps_its_sealed_work_for_the_rerun(tmp_path: Path) -> None:
    """Rank 1 (the other "node") seals segments, then meets a corrupt image: the run fails on both
    ranks with the image's one-line error, yet rank 0 indexes the segments rank 1 sealed, so the
    rerun encodes only the image that was never encoded."""
    data = _make_folder_data(tmp_path / "data", images=20)
    corrupt = data / "part" / "test" / "good" / "0019.png"  # the last image of rank 1's shard
    good_bytes = corrupt.read_bytes()
    corrupt.write_bytes(b"not an image")
    cache = tmp_path / "cache"
    command = _extract_command(data, tmp_path / "run", cache, "--batch-size", "1", "--quiet")
    # A segment sealed after every batch: rank 1 has handed several to rank 0 when it fails.
    agents = _on_two_nodes(command, IIPAD_STORE_SEAL_SECONDS="0")
    assert [a.returncode != 0 for a in agents] == [True, True]
    assert all("0019.png" in a.stderr and "rank 1 of 2: " in a.stderr for a in agents), agents[0].stderr[-2000:]
    assert not (tmp_path / "run" / "features.h5").exists()
    # 1 shot + 20 test images; rank 1's shard is the shot and test images 10-19, the last corrupt.
    assert _verified(cache) == 21 - 1

    corrupt.write_bytes(good_bytes)
    rerun = _run(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    entry = _extract_entry(tmp_path / "run")
    assert (entry["images_encoded"], entry["images_from_store"]) == (1, 20)
    assert _verified(cache) == 21


def _rank_pid(torchrun: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker with RANK=`rank` among torchrun's children (Linux /proc)."""
    children = Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children")
    if not children.is_file():
        return None
    for pid in children.read_text().split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def _holds_open_segment(pid: int) -> bool:
    """Whether the process has a store segment open for writing (encoded, not yet sealed)."""
    try:
        return any(os.readlink(fd).endswith(".h5.tmp") for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through Linux /proc")
def test_killed_rank_leaves_a_consistent_store_and_the_rerun_encodes_only_what_is_missing(tmp_path: Path) -> None:
    import signal
    import time

    data = _make_folder_data(tmp_path / "data", images=160)
    cache = tmp_path / "cache"
    # Batches of one image: the batch composition cannot differ between runs, so the resumed
    # features can be compared bit for bit with one process's.
    command = _torchrun(2, "--no-python", *_extract_command(data, tmp_path / "run", cache, "--batch-size", "1", "--quiet"))
    launched = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    killed = False
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while time.monotonic() < deadline and launched.poll() is None:
            pids = [_rank_pid(launched, rank) for rank in (0, 1)]
            if all(pid is not None and _holds_open_segment(pid) for pid in pids):
                assert pids[1] is not None
                os.kill(pids[1], signal.SIGKILL)  # rank 1 dies mid-run, its open segment unsealed
                killed = True
                break
            time.sleep(0.01)
        _, stderr = launched.communicate(timeout=PROCESS_TIMEOUT_S)
    finally:
        if launched.poll() is None:
            launched.kill()
    assert killed, "rank 0 or 1 finished before rank 1 could be killed mid-run"
    assert launched.returncode != 0
    assert not (tmp_path / "run" / "features.h5").exists()

    # The store verifies (only whole sealed segments are indexed) and keeps the batches rank 0
    # finished: torchrun's SIGTERM (or the lost peer) ends it at a batch boundary, segment sealed.
    kept = _verified(cache)
    needed = 161
    assert 0 < kept < needed

    rerun = _run(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    entry = _extract_entry(tmp_path / "run")
    assert (entry["images_encoded"], entry["images_from_store"]) == (needed - kept, kept)
    assert _verified(cache) == needed

    single = _run(_extract_command(data, tmp_path / "one", tmp_path / "cache-one", "--batch-size", "1", "--quiet"))
    assert single.returncode == 0, single.stderr
    _assert_same_features(tmp_path / "one" / "features.h5", tmp_path / "run" / "features.h5")
