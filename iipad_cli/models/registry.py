"""Backbone ids -> specs -> frozen encoders built in memory (config as data, open_clip style).

`vit-l-14` is OpenAI CLIP ViT-L/14 (QuickGELU, 224 px) + the BLIP-Diffusion Q-Former; `tiny` is the
same architecture at toy sizes with seeded random weights (tests, the offline demo). Loading real
weights from files is `iipad_cli/checkpoints.py`: models hold no I/O.
"""

from __future__ import annotations

import torch
from open_clip.model import CLIP

from iipad_cli.config import BackboneSpec, QFormerConfig
from iipad_cli.errors import IipadError
from iipad_cli.models.backbone import Backbone
from iipad_cli.models.qformer import QFormer, trunk_matches_clip

# The Hugging Face repositories the real weights come from (docs/weights.md).
CLIP_HF_REPO = "timm/vit_large_patch14_clip_224.openai"
QFORMER_HF_REPO = "Salesforce/blipdiffusion"

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
