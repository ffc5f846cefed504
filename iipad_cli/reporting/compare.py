"""Which runs `iipad metrics RUN RUN...` may put into one mean ± std.

The spread over several runs is meant to be the spread over shot draws and training seeds of one
experiment. Averaging a 1-shot with a 2-shot run, or two backbones, presets, precisions or data
sets, gives a number that means nothing (it used to print "1/2-shot" with no warning), and a run
given twice shrinks the std towards 0. So such sets are refused before anything is evaluated,
with a line saying which field differs; evaluate them in separate calls instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iipad_cli.artifacts import FEATURES_FILE, SCORES_FILE, require_file
from iipad_cli.errors import IipadError, UsageError

# What must be equal for runs to be averaged, in the order the refusal names them.
COMPARED = ("shots", "backbone", "weights", "preset", "precision", "data")


def run_identity(run_dir: Path) -> dict[str, Any]:
    """The fields of COMPARED for one run, from the attributes of its features and scores files."""
    from iipad_cli.schema.features import features_precision, load_features_attrs
    from iipad_cli.schema.scores import read_scores_attrs

    scores = read_scores_attrs(require_file(Path(run_dir) / SCORES_FILE, "score"))
    features = load_features_attrs(require_file(Path(run_dir) / FEATURES_FILE, "extract"))
    preset = scores.get("preset", "")
    try:
        preset = json.loads(preset).get("name", preset) if isinstance(preset, str) else preset
    except (ValueError, AttributeError):
        pass
    return {
        "shots": features.get("shots"),
        "backbone": features.get("backbone_id"),
        "weights": features.get("weights_sha256"),
        "preset": preset,
        "precision": features_precision(features),
        "data": {
            "root": features.get("data_root"),
            "classes": features.get("classes"),
            "listing": features.get("samples_sha256"),
        },
        "made_from": [scores.get(key) for key in ("features_sha256", "generator_sha256", "banks_sha256")],
    }


def _shown(field: str, value: Any) -> str:
    if field == "data":
        return f"{value['root']} ({len(value['classes'] or [])} classes, listing {str(value['listing'])[:8]})"
    if field == "weights":
        return "random weights" if value == ["random"] else f"weights {', '.join(str(v)[:8] for v in value or [])}"
    return repr(value)


def check_comparable(runs: list[Path]) -> None:
    """Refuse a run given twice (UsageError, exit 2) and runs that differ in a COMPARED field
    (IipadError naming the field and both values, exit 1)."""
    seen: dict[Path, Path] = {}
    for run in runs:
        resolved = Path(run).resolve()
        if resolved in seen:
            raise UsageError(f"{run}: the same run as {seen[resolved]}, given twice; each run may count once in the mean ± std")
        seen[resolved] = Path(run)
    identities = [run_identity(run) for run in runs]
    first, reference = runs[0], identities[0]
    origins: dict[str, Path] = {}
    for run, identity in zip(runs, identities):
        origin = json.dumps(identity["made_from"])
        if origin in origins:
            raise UsageError(
                f"{run}: holds the same scores as {origins[origin]} (a copy of that run?); each run may count once in the mean ± std"
            )
        origins[origin] = run
        for field in COMPARED:
            if identity[field] != reference[field]:
                raise IipadError(
                    f"{run}: {field} {_shown(field, identity[field])} differs from {first}'s {_shown(field, reference[field])}; "
                    "metrics averages only runs that differ in their seeds: evaluate the others in a separate call"
                )
