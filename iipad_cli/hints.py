"""Hints that work as printed: the exact command that fixes a run's state.

"Re-run `iipad extract`" used to lead nowhere: extract needs the data set and its options, and
with the same options it says "up to date, nothing to do" even when the stored features are
bad. So a hint about a run's features spells out the whole `iipad extract` command, rebuilt
from the options extract recorded in RUN/manifest.json (or, without a manifest entry, from the
features file's own attributes), with `--force` where the file must be replaced.
`tests/test_faults.py` runs every hint as printed and checks that it repairs the run.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from iipad_cli.artifacts import FEATURES_FILE, read_manifest, shell_path
from iipad_cli.errors import IipadError


def _recorded_extract(run_dir: Path) -> dict[str, Any] | None:
    """extract's options: the manifest entry, else the features file's attributes, else None."""
    try:
        entry = read_manifest(run_dir).get("stages", {}).get("extract")
    except IipadError:
        entry = None
    if entry is not None:
        return dict(entry.get("options", {}))
    from iipad_cli.schema.features import read_attrs

    try:
        # Without a hint of its own: building it would come back here (an unreadable file).
        attrs = read_attrs(run_dir / FEATURES_FILE, hint=False)
    except (IipadError, OSError, KeyError):
        return None
    return {
        "data": attrs.get("data_root"),
        "shots": attrs.get("shots"),
        "backbone": attrs.get("backbone_id"),
        "layout": attrs.get("layout"),
        "classes": attrs.get("classes"),
        "shot_policy": attrs.get("shot_policy"),
        "seed": attrs.get("seed"),
        "resolution": attrs.get("resolution"),
        "precision": attrs.get("precision"),
        "copy": not bool(attrs.get("virtual", True)),
    }


def stage_command(stage: str, run_dir: Path) -> str:
    """`iipad STAGE RUN` (in backticks), for the stages that need nothing but the run directory."""
    return f"`iipad {stage} {shell_path(run_dir)}`"


def extract_command(run_dir: Path, *, force: bool) -> str:
    """`iipad extract DATA --shots K ... -o RUN [--force]` as the run was made (in backticks)."""
    run_dir = Path(run_dir)
    recorded = _recorded_extract(run_dir)
    if recorded is None or recorded.get("data") is None:
        line = f"iipad extract DATA --shots K -o {shell_path(run_dir)}"
    else:
        parts = ["iipad", "extract", shell_path(recorded["data"]), "--shots", str(recorded["shots"])]
        flags = (
            ("--backbone", recorded.get("backbone")),
            ("--weights", recorded.get("weights")),
            ("--layout", recorded.get("layout")),
            ("--classes", ",".join(recorded["classes"]) if recorded.get("classes") else None),
            ("--shot-policy", recorded.get("shot_policy")),
            ("--seed", recorded.get("seed")),
            ("--resolution", recorded.get("resolution")),
            # The features depend on the precision; the store and --copy decide where they go.
            ("--precision", recorded.get("precision")),
            ("--cache", recorded.get("cache")),
        )
        for flag, value in flags:
            if value is not None:
                parts += [flag, shell_path(value) if flag in ("--weights", "--cache") else shlex.quote(str(value))]
        if recorded.get("copy"):
            parts.append("--copy")
        parts += ["-o", shell_path(run_dir)]
        line = " ".join(parts)
    return f"`{line}{' --force' if force else ''}`"
