"""`iipad weights`: inspect, convert and download the real backbone's weight files.

The real `vit-l-14` backbone needs two files: the OpenAI CLIP ViT-L/14 open_clip checkpoint and the
BLIP-Diffusion Q-Former checkpoint (docs/weights.md). `check` loads them through the same loader the
stages use, so "check passes" means "extract will load them"; `convert` turns the released Q-Former
pickle into a safetensors file holding only the keys iipad's Q-Former reads; `fetch` downloads just
those two files on a networked machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from iipad_cli.artifacts import atomic_path
from iipad_cli.checkpoints import CLIP_WEIGHT_FILES, QFORMER_WEIGHT_FILES, find_weights, load_backbone, load_qformer_state_dict
from iipad_cli.digests import sha256_file
from iipad_cli.errors import IipadError
from iipad_cli.models.qformer import QFormer, validate_qformer_state_dict
from iipad_cli.models.registry import CLIP_HF_REPO, QFORMER_HF_REPO, get_spec
from iipad_cli.schema._safetensors import canonical_safetensors

# The files `fetch` downloads, as (repository, file inside it); saved under the same relative path.
FETCH_FILES: tuple[tuple[str, str], ...] = (
    (CLIP_HF_REPO, CLIP_WEIGHT_FILES[0]),
    (QFORMER_HF_REPO, "qformer/pytorch_model.bin"),
)


@dataclass(frozen=True)
class WeightFile:
    role: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class WeightsReport:
    """What `iipad weights check` found for one backbone."""

    backbone_id: str
    random_weights: bool
    files: tuple[WeightFile, ...]
    trunk_shared: bool

    def to_json(self) -> dict[str, object]:
        return {
            "backbone": self.backbone_id,
            "random_weights": self.random_weights,
            "trunk_shared": self.trunk_shared,
            "files": [
                {"role": item.role, "path": str(item.path), "size": item.size, "sha256": item.sha256}
                for item in self.files
            ],
        }


def check_weights(backbone_id: str, weights_dir: Path | None) -> WeightsReport:
    """Locate and load the backbone's weights (IipadError naming the files when they are missing)."""
    spec = get_spec(backbone_id)
    paths = find_weights(spec, weights_dir)
    backbone = load_backbone(spec, weights_dir)
    if paths is None:
        return WeightsReport(spec.backbone_id, True, (), backbone.trunk_shared)
    files = tuple(
        WeightFile(role, path, path.stat().st_size, sha256_file(path))
        for role, path in (("clip", paths.clip), ("qformer", paths.qformer))
    )
    return WeightsReport(spec.backbone_id, False, files, backbone.trunk_shared)


def default_convert_output(source: Path) -> Path:
    """`DIR/qformer/pytorch_model.bin` -> `DIR/qformer.safetensors`, the name the loader tries first;
    any other source -> the same name with a `.safetensors` suffix."""
    if source.parent.name == "qformer":
        return source.parent.parent / QFORMER_WEIGHT_FILES[0]
    return source.with_suffix(".safetensors")


def _unshared(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, each with its own storage (safetensors refuses shared storage).

    Only tensors whose storage was already seen are copied, so the 2 GB checkpoint is not doubled.
    """
    seen: set[int] = set()
    result: dict[str, Tensor] = {}
    for key, tensor in state.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        result[key] = tensor
    return result


@dataclass(frozen=True)
class ConvertReport:
    output: Path
    kept: int
    dropped: tuple[str, ...]


def convert_qformer(source: Path, output: Path | None, backbone_id: str = "vit-l-14", force: bool = False) -> ConvertReport:
    """Q-Former checkpoint -> safetensors with exactly the keys iipad's Q-Former uses.

    The checkpoint is validated against the architecture of `backbone_id` (strictly, after dropping
    keys iipad does not use), so a converted file always loads.
    """
    source = Path(source)
    if not source.is_file():
        raise IipadError(f"{source}: no such Q-Former checkpoint")
    output = default_convert_output(source) if output is None else Path(output)
    if output.exists() and not force:
        raise IipadError(f"{output}: already exists; pass --force to replace it")
    spec = get_spec(backbone_id)
    state = load_qformer_state_dict(source)
    with torch.device("meta"):
        model = QFormer(spec.qformer)
    used = set(model.state_dict())
    dropped = tuple(sorted(key for key in state if key not in used))
    kept = {key: value for key, value in state.items() if key in used}
    validate_qformer_state_dict(model, kept, source=source)
    metadata = {"source": source.name, "source_sha256": sha256_file(source), "backbone": spec.backbone_id}
    with atomic_path(output) as tmp:
        tmp.write_bytes(canonical_safetensors(_unshared(kept), metadata))
    return ConvertReport(output=output, kept=len(kept), dropped=dropped)


def fetch_weights(weights_dir: Path) -> list[Path]:
    """Download the two weight files into `weights_dir` (the layout `--weights DIR` expects).

    Any failure of the hub client (offline, DNS, HTTP, disk) becomes one IipadError line.
    """
    from huggingface_hub import hf_hub_download

    weights_dir = Path(weights_dir)
    downloaded: list[Path] = []
    for repo, filename in FETCH_FILES:
        try:
            path = hf_hub_download(repo_id=repo, filename=filename, local_dir=weights_dir)
        except Exception as error:  # the hub raises many unrelated types; all mean "not fetched"
            reason = (str(error).strip().splitlines() or [""])[0]
            raise IipadError(
                f"cannot download {filename} from the Hugging Face repo {repo} into {weights_dir} "
                f"({type(error).__name__}: {reason}); run `iipad weights fetch` on a networked machine "
                "and copy the directory here"
            ) from None
        downloaded.append(Path(path))
    return downloaded
