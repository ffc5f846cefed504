"""The frozen encoders of one backbone, and the single image pass that `extract` and `predict` run."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from open_clip.model import CLIP
from torch import Tensor

from iipad_cli.config import BackboneSpec
from iipad_cli.devices import DTYPES
from iipad_cli.models.precision import cast_matmul_weights
from iipad_cli.models.qformer import QFormer
from iipad_cli.models.text import PromptTextEncoder
from iipad_cli.models.vv_clip import vv_forward


@dataclass
class ImageFeatures:
    """Per-image features in the `features.h5` layout (fp32 at either precision; stored as fp16).

    cls_token: (B, 2, embed_dim)  E_v(x) without / with ln_post
    qformer:   (B, M, d)          Q-Former object tokens Z
    vv:        (B, len(vv_layers), P, embed_dim)
    mem:       (B, len(memory_layers), P, vision_width)
    """

    cls_token: Tensor
    qformer: Tensor
    vv: Tensor
    mem: Tensor


@dataclass
class Backbone:
    """CLIP (visual + text) and the Q-Former of one backbone spec, frozen and in eval mode.

    `trunk_shared` is True when the Q-Former's vision tower has exactly the CLIP visual tower's
    weights for its blocks, so the dual-path pass can feed it (design.md §4).
    `weights` maps each weight source to its sha256 (or to "random(seed=N)").
    `precision` is the dtype of the image encoders' matmuls ("fp32" or "bf16", `set_precision`).
    """

    spec: BackboneSpec
    clip: CLIP
    qformer: QFormer
    trunk_shared: bool
    weights: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        self.clip.eval().requires_grad_(False)
        self.qformer.eval().requires_grad_(False)
        self.text_encoder = PromptTextEncoder(self.clip)

    @property
    def random_weights(self) -> bool:
        return all(value.startswith("random") for value in self.weights.values())

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def to(self, device: torch.device | str) -> "Backbone":
        self.clip.to(device)
        self.qformer.to(device)
        return self

    def set_precision(self, precision: str) -> "Backbone":
        """Run the image encoders' transformer-block matmuls in `precision` ("fp32" or "bf16").

        bf16 casts the linear layers of the CLIP visual blocks, the Q-Former vision tower and its
        querying transformer once; embeddings, LayerNorms, the residual streams, CLIP's output
        projection, the Q-Former's `proj_layer` and the text tower stay fp32 (models/precision.py).
        Casting is one-way: a bf16 backbone cannot go back to fp32 weights.
        """
        if precision == self.precision:
            return self
        if (self.precision, precision) != ("fp32", "bf16"):
            raise ValueError(f"cannot change a {self.precision} backbone to {precision!r}")
        dtype = DTYPES[precision]
        cast_matmul_weights(self.clip.visual.transformer, dtype)
        cast_matmul_weights(self.qformer.visual_encoder.encoder, dtype)
        cast_matmul_weights(self.qformer.encoder, dtype)
        self.precision = precision
        return self

    def encode_images(self, images: Tensor, share_trunk: bool | None = None) -> ImageFeatures:
        """All frozen-encoder features of a preprocessed batch (B, 3, S, S) in one ViT pass.

        `share_trunk=None` shares the trunk exactly when the weights allow it; False forces the
        Q-Former to run its own vision tower (for benchmarks and the equivalence test).
        """
        share = self.trunk_shared if share_trunk is None else share_trunk
        if share and not self.trunk_shared:
            raise ValueError("trunk sharing requested but the Q-Former vision weights differ from CLIP's")
        spec = self.spec
        visual = vv_forward(
            self.clip.visual,
            images,
            vv_start_layer=spec.vv_start_layer,
            vv_layers=spec.vv_layers,
            memory_layers=spec.memory_layers,
            trunk_depth=spec.trunk_depth if share else None,
        )
        if share:
            assert visual.trunk is not None
            tokens = self.qformer.forward_from_trunk(visual.trunk)
        else:
            tokens = self.qformer(images)
        return ImageFeatures(cls_token=visual.cls_token, qformer=tokens, vv=visual.vv, mem=visual.mem)
