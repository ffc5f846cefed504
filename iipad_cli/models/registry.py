"""Backbone ids -> specs -> frozen encoders, with real weights from disk or seeded random weights.

`vit-l-14` is OpenAI CLIP ViT-L/14 (QuickGELU, 224 px) + the BLIP-Diffusion Q-Former; its weights
are looked up in `--weights DIR`, then `$IIPAD_WEIGHTS`, then the Hugging Face cache. `tiny` is the
same architecture at toy sizes with seeded random weights (tests, the offline demo); it also
loads weights from a directory, through the same loader, when one is given.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP

from iipad_cli.config import BackboneSpec, QFormerConfig
from iipad_cli.errors import IipadError
from iipad_cli.models.backbone import Backbone
from iipad_cli.models.qformer import QFormer, load_qformer_state_dict, load_qformer_weights, trunk_matches_clip

# File names inside a weights directory (the names the Hugging Face repos use).
CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
QFORMER_WEIGHT_FILES = ("qformer.safetensors", "qformer/model.safetensors", "qformer/pytorch_model.bin")
CLIP_HF_REPO = "timm/vit_large_patch14_clip_224.openai"
QFORMER_HF_REPO = "Salesforce/blipdiffusion"
WEIGHTS_ENV = "IIPAD_WEIGHTS"

VIT_L_14 = BackboneSpec(
    backbone_id="vit-l-14",
    clip_config={
        "embed_dim": 768,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
    },
    qformer=QFormerConfig(),
    vv_start_layer=6,
    vv_layers=(6, 12, 18, 24),
    memory_layers=(6, 18),
    random_weights=False,
    weight_files=(f"{CLIP_HF_REPO}: open_clip_model.safetensors", f"{QFORMER_HF_REPO}: qformer/pytorch_model.bin"),
    description="OpenAI CLIP ViT-L/14 (QuickGELU, 224 px) + BLIP-Diffusion Q-Former",
)

# Same architectures at toy sizes. Depth 5 keeps the ViT-L/14 pattern: V-V from the second-to-
# first quarter, four V-V layers ending at the last block, two memory layers, Q-Former trunk = depth-1.
TINY = BackboneSpec(
    backbone_id="tiny",
    clip_config={
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 5, "width": 64, "patch_size": 14, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    qformer=QFormerConfig(
        vision_width=64,
        vision_layers=4,
        vision_heads=4,
        vision_mlp=256,
        hidden=32,
        layers=2,
        heads=2,
        intermediate=64,
    ),
    vv_start_layer=2,
    vv_layers=(2, 3, 4, 5),
    memory_layers=(2, 4),
    random_weights=True,
    seed=0,
    description="toy-size CLIP + Q-Former with seeded random weights (tests and the offline demo)",
)

SPECS: dict[str, BackboneSpec] = {spec.backbone_id: spec for spec in (VIT_L_14, TINY)}


def get_spec(backbone_id: str) -> BackboneSpec:
    try:
        spec = SPECS[backbone_id]
    except KeyError:
        raise IipadError(f"unknown backbone {backbone_id!r}; choose one of: {', '.join(SPECS)}") from None
    spec.validate()
    return spec


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
        "on a networked machine `iipad weights fetch --weights DIR` downloads just these files"
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


def _hash_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iipad" / "weight-hashes.json"


def file_sha256(path: Path) -> str:
    """sha256 of a weight file, cached by (path, size, mtime): checkpoints are gigabytes."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = _hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return str(cache[key])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1))
    except OSError:
        pass  # a read-only home only costs re-hashing next time
    return str(cache[key])


def build_clip(spec: BackboneSpec) -> CLIP:
    cfg = spec.clip_config
    return CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=cfg["vision_cfg"],
        text_cfg=cfg["text_cfg"],
        quick_gelu=cfg["quick_gelu"],
    )


def _reinitialise_normal(module: torch.nn.Module, seed: int) -> None:
    """Seeded N(0, 0.02) weights, LayerNorms at identity.

    open_clip's default init of some tensors is tiny; at full size that produces denormals that
    make CPU matmuls ~8x slower (backbones.md), so random models are always re-initialised.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if tensor.ndim == 1 and ("ln" in name or "norm" in name.lower() or "LayerNorm" in name):
                tensor.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                tensor.zero_()
            elif name.endswith("logit_scale"):
                tensor.fill_(float(torch.log(torch.tensor(100.0))))
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)


def build_random_backbone(spec: BackboneSpec, *, seed: int | None = None, tie_trunk: bool = True) -> Backbone:
    """The spec's architecture with seeded random weights.

    With `tie_trunk` the Q-Former's vision tower gets the CLIP visual tower's weights, as the real
    BLIP-Diffusion tower is built from CLIP ViT-L/14 blocks, so trunk sharing is exercised.
    """
    seed = spec.seed if seed is None else seed
    clip = build_clip(spec)
    qformer = QFormer(spec.qformer)
    _reinitialise_normal(clip, seed)
    _reinitialise_normal(qformer, seed + 1)
    if tie_trunk:
        qformer.tie_vision_to_clip(clip.visual)
    shared = trunk_matches_clip(qformer, clip.visual)
    return Backbone(spec=spec, clip=clip, qformer=qformer, trunk_shared=shared, weights={"random": f"random(seed={seed})"})


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
    weights = {str(paths.clip): file_sha256(paths.clip), str(paths.qformer): file_sha256(paths.qformer)}
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
