"""Run-directory artifacts: atomic writes, hashes, provenance and the manifest.

Every stage writes `NAME.tmp` in the run directory, fsyncs it and renames it over `NAME`, so an
interrupted stage never leaves a half-written artifact in place of a complete one.
`RUN/manifest.json` records each stage run (options, timings, versions, input/output hashes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from iipad_cli import __version__
from iipad_cli.digests import sha256_file as sha256_file  # artifacts are named by this digest
from iipad_cli.errors import IipadError
from iipad_cli.writes import reporting_write_errors

FEATURES_FILE = "features.h5"
GENERATOR_FILE = "generator.safetensors"
TRAIN_LOG_FILE = "train_log.csv"
MANUAL_PROMPTS_FILE = "manual_prompts.safetensors"
BANKS_FILE = "banks.safetensors"
SCORES_FILE = "scores.h5"
THRESHOLDS_FILE = "thresholds.json"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
MANIFEST_FILE = "manifest.json"
HEATMAPS_DIR = "heatmaps"

# Bumped whenever a stored layout changes incompatibly (docs/artifacts.md).
SCHEMA_VERSION = 1


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield `path.tmp` to write to; on success fsync it and rename it over `path`.

    On an exception the temporary file is removed and `path` is left untouched; a failed write
    (full disk, read-only, permissions...) is reported as a one-line IipadError naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with reporting_write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def sha256_json(data: Any) -> str:
    """Stable hash of a JSON-serialisable value (stage options, configs)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def shell_path(path: Path | str) -> str:
    """A path as a shell word that no command reads as an option (quoted; `./` before a dash)."""
    text = str(path)
    return shlex.quote(f"./{text}" if text.startswith("-") else text)


def require_file(path: Path, made_by: str) -> Path:
    """The artifact at `path`, or a one-line error saying which stage makes it."""
    if not Path(path).is_file():
        run = f" {shell_path(Path(path).parent)}" if made_by in ("train", "bank", "score") else ""
        raise IipadError(f"{path}: missing; run `iipad {made_by}{run}` first")
    return Path(path)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        return {"schema_version": SCHEMA_VERSION, "stages": {}, "history": []}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise IipadError(f"{path}: not valid JSON ({error})") from None


def record_stage(
    run_dir: Path,
    stage: str,
    *,
    options: dict[str, Any],
    inputs: dict[str, str],
    outputs: dict[str, str],
    seconds: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Record one stage run in the manifest: the latest entry per stage plus an append-only history.

    `inputs`/`outputs` map artifact names to sha256 hashes; `iipad run` compares them to decide
    whether a stage is current.
    """
    manifest = read_manifest(run_dir)
    entry = {
        "stage": stage,
        "iipad_version": __version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
        "options": options,
        "options_hash": sha256_json(options),
        "inputs": inputs,
        "outputs": outputs,
        **(extra or {}),
    }
    manifest.setdefault("stages", {})[stage] = entry
    manifest.setdefault("history", []).append({"stage": stage, "finished_at": entry["finished_at"], "seconds": entry["seconds"]})
    manifest["schema_version"] = SCHEMA_VERSION
    write_json_atomic(Path(run_dir) / MANIFEST_FILE, manifest)
    return entry


def provenance(**fields: Any) -> dict[str, str]:
    """String-valued provenance for safetensors metadata / HDF5 attributes (JSON-encoded values)."""
    meta = {"iipad_version": __version__, "schema_version": str(SCHEMA_VERSION)}
    for key, value in fields.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return meta
