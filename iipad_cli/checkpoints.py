"""Weight files on disk: where they are looked up, how a backbone is loaded from them, and how a
backbone's weights are written in the real checkpoint formats.

`models/` builds architectures and holds no I/O; this module does the file side: `--weights DIR`,
then `$IIPAD_WEIGHTS`, then the Hugging Face cache (no network: a hub client is never called), the
open_clip checkpoint and the BLIP-Diffusion Q-Former checkpoint (`.bin` pickle read with
`weights_only=True`, or safetensors). Weight files are named by their sha256 through the one digest
cache (`iipad_cli/digests.py`).
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from iipad_cli.config import BackboneSpec
from iipad_cli.digests import sha256_file
from iipad_cli.errors import IipadError
from iipad_cli.models.backbone import Backbone
from iipad_cli.models.qformer import QFormer, load_qformer_weights, trunk_matches_clip
from iipad_cli.models.registry import CLIP_HF_REPO, QFORMER_HF_REPO, build_clip, build_random_backbone

# File names inside a weights directory (the names the Hugging Face repos use).
CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
QFORMER_WEIGHT_FILES = ("qformer.safetensors", "qformer/model.safetensors", "qformer/pytorch_model.bin")
WEIGHTS_ENV = "IIPAD_WEIGHTS"


@dataclass(frozen=True)
class WeightPaths:
    clip: Path
    qformer: Path


def _hf_cache_dir() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    if "HF_HOME" in os.environ:
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _first_existing(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def _hf_snapshot_file(repo: str, names: tuple[str, ...]) -> Path | None:
    snapshots = _hf_cache_dir() / f"models--{repo.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    for snapshot in sorted(snapshots.iterdir()):
        found = _first_existing(snapshot, names)
        if found is not None:
            return found
    return None


def missing_weights_message(spec: BackboneSpec, searched: list[Path]) -> str:
    where = ", ".join(str(path) for path in searched) or "(no directory given)"
    return (
        f"weights for backbone {spec.backbone_id} not found (searched {where} and the Hugging Face cache "
        f"{_hf_cache_dir()}): put {CLIP_WEIGHT_FILES[0]} (from {CLIP_HF_REPO}) and qformer/pytorch_model.bin "
        f"(from {QFORMER_HF_REPO}) in one directory and pass --weights DIR or set ${WEIGHTS_ENV}; "
        "on a networked machine `iipad weights fetch --weights DIR` downloads just these files; "
        "to try iipad without weights, use `--backbone tiny` (random weights, offline) or `iipad demo`"
    )


def find_weights(spec: BackboneSpec, weights_dir: Path | None) -> WeightPaths | None:
    """Locate the CLIP and Q-Former checkpoints; None when none are given for a random-weight spec.

    An explicit directory must hold both files. Without one, `$IIPAD_WEIGHTS` and then the Hugging
    Face cache are searched (real-weight backbones only).
    """
    directories: list[Path] = []
    if weights_dir is not None:
        directories.append(Path(weights_dir))
    elif os.environ.get(WEIGHTS_ENV) and not spec.random_weights:
        directories.append(Path(os.environ[WEIGHTS_ENV]))
    for directory in directories:
        clip_file = _first_existing(directory, CLIP_WEIGHT_FILES)
        qformer_file = _first_existing(directory, QFORMER_WEIGHT_FILES)
        if clip_file is not None and qformer_file is not None:
            return WeightPaths(clip=clip_file, qformer=qformer_file)
        raise IipadError(missing_weights_message(spec, directories))
    if spec.random_weights:
        return None
    clip_file = _hf_snapshot_file(CLIP_HF_REPO, CLIP_WEIGHT_FILES)
    qformer_file = _hf_snapshot_file(QFORMER_HF_REPO, ("qformer/pytorch_model.bin", "qformer/model.safetensors"))
    if clip_file is not None and qformer_file is not None:
        return WeightPaths(clip=clip_file, qformer=qformer_file)
    raise IipadError(missing_weights_message(spec, directories))


def load_qformer_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a Q-Former checkpoint: the released `.bin` pickle (weights_only) or a safetensors file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise IipadError(f"{path}: cannot read the Q-Former checkpoint ({first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise IipadError(f"{path}: not a Q-Former checkpoint (expected a flat dict of tensors)")
    return state


def load_backbone(
    spec: BackboneSpec, weights_dir: Path | None = None, device: str | torch.device = "cpu", precision: str = "fp32"
) -> Backbone:
    """Build the backbone of `spec`: real weights when found, seeded random weights for `tiny`.

    `precision` ("fp32" or "bf16", already resolved: devices.resolve_precision) is that of the
    image encoders' matmuls (`Backbone.set_precision`).
    """
    paths = find_weights(spec, weights_dir)
    if paths is None:
        return build_random_backbone(spec).set_precision(precision).to(device)
    clip = build_clip(spec)
    try:
        open_clip.load_checkpoint(clip, str(paths.clip), strict=True)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise IipadError(f"{paths.clip}: not a {spec.backbone_id} open_clip checkpoint ({first_line})") from None
    qformer = QFormer(spec.qformer)
    load_qformer_weights(qformer, load_qformer_state_dict(paths.qformer), source=paths.qformer)
    shared = trunk_matches_clip(qformer, clip.visual)
    weights = {str(paths.clip): sha256_file(paths.clip), str(paths.qformer): sha256_file(paths.qformer)}
    backbone = Backbone(spec=spec, clip=clip, qformer=qformer, trunk_shared=shared, weights=weights)
    return backbone.set_precision(precision).to(device)


def export_weights(backbone: Backbone, directory: Path, qformer_format: str = "bin") -> WeightPaths:
    """Write a backbone's weights in the real checkpoint formats (open_clip safetensors + the
    BLIP-Diffusion `qformer/pytorch_model.bin` pickle or `qformer.safetensors`).

    Tests and the demo use it to push `tiny` through the same loader as the real weights.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    clip_path = directory / CLIP_WEIGHT_FILES[0]
    save_file({k: v.contiguous() for k, v in backbone.clip.state_dict().items()}, str(clip_path))
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": backbone.spec.clip_config, "preprocess_cfg": {}}, indent=2)
    )
    state = {k: v.contiguous() for k, v in backbone.qformer.state_dict().items()}
    if qformer_format == "bin":
        qformer_path = directory / "qformer" / "pytorch_model.bin"
        qformer_path.parent.mkdir(exist_ok=True)
        torch.save(state, qformer_path)
    elif qformer_format == "safetensors":
        qformer_path = directory / "qformer.safetensors"
        save_file(state, str(qformer_path))
    else:
        raise ValueError(f"unknown Q-Former format {qformer_format!r}")
    return WeightPaths(clip=clip_path, qformer=qformer_path)
