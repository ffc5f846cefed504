"""Analytic per-image FLOP counts of every stage, from a `BackboneSpec` alone.

Why analytic: `torch.utils.flop_counter` undercounts attention on CPU (backbones.md), and the
benchmarks need a count that does not depend on which kernel ran. Conventions follow
reference-implementation.md §8: dense matmuls only (LayerNorm, softmax, activations, the Gaussian
filter are ignored), one multiply-add = 2 FLOP. Functions named `*_macs` return multiply-adds;
`gflop(macs)` converts.

Pure Python (no torch) so the report and its tests run anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from iipad_cli.config import BackboneSpec, QFormerConfig

# The prompt generator's learned-prompt length T and object-token count m (reference §3);
# T' = T + m prompt vectors go through the text encoder between [SOT] and [EOT].
PROMPT_TOKENS = 24
OBJECT_TOKENS = 4
# Token-mixing width of the generator's CLS branches (Linear(1,16) then Linear(16,24)).
GENERATOR_MIX = 16
# The released code calls the Q-Former with ['object'] * 10 (reference §2).
RELEASED_QFORMER_BATCH = 10
# Manual prompt ensemble sentences (normal 154 + anomalous 2772 for MVTec; reference §3), each a
# full 77-token `encode_text` pass, computed once per run by both iipad and the released code.
MVTEC_MANUAL_PROMPTS = 154 + 2772


def gflop(macs: float) -> float:
    """GFLOP from multiply-adds (GFLOP = 2·MAC / 1e9)."""
    return 2.0 * macs / 1e9


def _mlp_ratio(cfg: dict) -> float:
    return float(cfg.get("mlp_ratio", 4.0))


def transformer_block_macs(tokens: int, width: int, mlp_width: int) -> int:
    """One pre-LN transformer block: qkv + out-proj (4·N·D²), MLP (2·N·D·F), q·kᵀ and attn·v (2·N²·D).

    With F = 4·D this is the 12·D²·N + 2·N²·D of backbones.md.
    """
    return 4 * tokens * width * width + 2 * tokens * width * mlp_width + 2 * tokens * tokens * width


def patch_embed_macs(num_patches: int, patch_size: int, width: int, channels: int = 3) -> int:
    """The patch convolution as a (P × 3·p²) @ (3·p² × D) matmul."""
    return num_patches * channels * patch_size * patch_size * width


def dual_path_extra_macs(tokens: int, width: int) -> int:
    """What one dual-path block adds over a plain block (vv_clip.dual_path_block).

    The qkv projection is computed once and shared; the V-V path adds a second attention
    (v·vᵀ and attn·v: 2·N²·D over all heads) and a second out-projection (N·D²). No MLP.
    """
    return 2 * tokens * tokens * width + tokens * width * width


def vv_clip_macs(spec: BackboneSpec) -> dict[str, int]:
    """One dual-path V-V CLIP forward (vv_clip.vv_forward), split into its parts."""
    vision = spec.clip_config["vision_cfg"]
    width, depth = spec.vision_width, spec.vision_depth
    tokens = spec.num_patches + 1
    mlp = int(width * _mlp_ratio(vision))
    dual_blocks = depth - spec.vv_start_layer + 1
    return {
        "patch_embed": patch_embed_macs(spec.num_patches, spec.patch_size, width),
        "blocks": depth * transformer_block_macs(tokens, width, mlp),
        "dual_path_extra": dual_blocks * dual_path_extra_macs(tokens, width),
        # ln_post(x_vv[:, 1:]) @ proj at every V-V layer, and the two CLS · proj.
        "vv_projection": len(spec.vv_layers) * spec.num_patches * width * spec.embed_dim,
        "cls_projection": 2 * width * spec.embed_dim,
    }


def qformer_vision_macs(config: QFormerConfig) -> int:
    """The Q-Former's own vision tower (patch embed + `vision_layers` CLIP blocks)."""
    grid = config.image_size // config.patch_size
    tokens = grid * grid + 1
    return patch_embed_macs(grid * grid, config.patch_size, config.vision_width) + config.vision_layers * (
        transformer_block_macs(tokens, config.vision_width, config.vision_mlp)
    )


def qformer_bert_macs(config: QFormerConfig, image_tokens: int, batch: int = 1) -> int:
    """The BERT querying transformer + projection for `batch` copies of one image's query.

    Per layer, over T = M + 3 tokens (M queries, "[CLS] object [SEP]"): self-attention over all T
    (4·T·H² + 2·T²·H); cross-attention for the M query positions only (q and out-proj 2·M·H²,
    scores and attn·v 2·M·N·H) with keys/values projected from the N image tokens (2·N·Dv·H);
    separate query/text FFNs (2·T·H·I together). The projection layer runs on the M queries
    (2·M·H·I). The released code runs `batch` = 10 identical rows against one image, whose
    keys/values are projected once and broadcast, so only that term does not scale with `batch`.
    """
    hidden, inter = config.hidden, config.intermediate
    queries = config.num_query_tokens
    tokens = queries + len(config.text_ids)
    per_row = (
        4 * tokens * hidden * hidden
        + 2 * tokens * tokens * hidden
        + 2 * queries * hidden * hidden
        + 2 * queries * image_tokens * hidden
        + 2 * tokens * hidden * inter
    )
    image_kv = 2 * image_tokens * config.vision_width * hidden
    projection = 2 * queries * hidden * inter
    return config.layers * (batch * per_row + image_kv) + batch * projection


@dataclass(frozen=True)
class TextMacs:
    """A text-encoder pass split by how its backward pass scales.

    linear: matmuls against (frozen) weights; attention: q·kᵀ and attn·v, both operands activations.
    """

    linear: int
    attention: int

    @property
    def forward(self) -> int:
        return self.linear + self.attention

    def backward(self, weight_grads: bool) -> int:
        """Input gradients cost one forward of each linear and two of each attention product
        (both operands need a gradient); weight gradients, when the weights require them
        (the released code leaves them on), cost one more forward of each linear."""
        return self.linear * (2 if weight_grads else 1) + 2 * self.attention


def text_macs(spec: BackboneSpec, length: int) -> TextMacs:
    """One prompt through the CLIP text encoder at `length` positions + the EOT projection.

    length = T' + 2 (30) in iipad (truncated context), 77 in the released code.
    """
    text = spec.clip_config["text_cfg"]
    width, layers = spec.text_width, int(text["layers"])
    mlp = int(width * _mlp_ratio(text))
    linear = layers * (4 * length * width * width + 2 * length * width * mlp) + width * spec.embed_dim
    return TextMacs(linear=linear, attention=layers * 2 * length * length * width)


def truncated_length() -> int:
    """[SOT] + T' prompt vectors + [EOT]."""
    return PROMPT_TOKENS + OBJECT_TOKENS + 2


def prompt_generator_macs(spec: BackboneSpec, extra_cls_branch: bool = True) -> int:
    """Both states (normal, abnormal) of the prompt generator for one image (reference §3).

    Shared: W·c (D²). Per state: the extra CLS branch g (Linear(1,16) token mix, channel Linear on
    16 tokens, Linear(16,24) token mix), Zⁿ (channel Linear on the M query tokens, M×M token mix),
    the 1-head cross-attention (q from c, k/v from M tokens, out-proj), f (as g), and the object
    tokens O (M→8→m token mixing).
    """
    d = spec.text_width
    m = spec.qformer.num_query_tokens
    mix, t, o = GENERATOR_MIX, PROMPT_TOKENS, OBJECT_TOKENS
    shared = d * d + t * d
    cls_branch = mix * d + mix * d * d + t * mix * d
    z_branch = m * d * d + m * m * d
    cross_attention = d * d + 2 * m * d * d + 2 * m * d + d * d
    objects = 8 * m * d + o * 8 * d
    per_state = z_branch + cross_attention + cls_branch + objects + (cls_branch if extra_cls_branch else 0)
    return shared + 2 * per_state


def train_loss_macs(spec: BackboneSpec) -> int:
    """Semantic + token-level losses over the V-V layers (reference §4), one image, forward.

    Per layer: 4 patch-vs-embedding cosines over P patches (4·P·E) and, for each of the 2 states,
    the token-patch similarity M = p·Fᵀ (T'·P·E), the weighted groups W·F (T'·P·E) and the two
    T'×T' logit matrices (2·T'²·E).
    """
    e = spec.embed_dim
    p = spec.num_patches
    tp = PROMPT_TOKENS + OBJECT_TOKENS
    per_layer = 4 * p * e + 2 * (2 * tp * p * e + 2 * tp * tp * e)
    return len(spec.vv_layers) * per_layer


def score_extra_macs(spec: BackboneSpec, bank_size: int, top_k: int) -> dict[str, int]:
    """Scoring work beyond the generator and text passes, for one test image (reference §5).

    retrieval: token-aligned Q-Former similarity against every bank entry (bank·M·d);
    prompt_maps: each V-V layer's P patches against the 2 fused embeddings (Lv·P·2·E);
    knn: each memory layer's P patches against the k retrieved images' P patches (Lm·P·k·P·W).
    """
    d = spec.qformer.hidden
    p = spec.num_patches
    return {
        "retrieval": bank_size * spec.qformer.num_query_tokens * d,
        "prompt_maps": len(spec.vv_layers) * p * 2 * spec.embed_dim,
        "knn": len(spec.memory_layers) * p * top_k * p * spec.vision_width,
        "p_norm": top_k * 2 * spec.embed_dim,
    }


def extract_macs(spec: BackboneSpec, share_trunk: bool) -> dict[str, int]:
    """iipad `extract`, per image: the V-V pass, the Q-Former (own vision tower unless shared)."""
    parts = dict(vv_clip_macs(spec))
    parts["qformer_vision"] = 0 if share_trunk else qformer_vision_macs(spec.qformer)
    parts["qformer_bert"] = qformer_bert_macs(spec.qformer, spec.num_patches + 1)
    return parts


def train_step_macs(spec: BackboneSpec, text_length: int, *, text_weight_grads: bool, extra_cls_branch: bool = True) -> dict[str, int]:
    """One training image step without the frozen image encoders: generator forward + backward
    (weights and inputs: 3 forwards), two text passes forward + backward, losses forward + backward
    (input gradients: 2 forwards)."""
    text = text_macs(spec, text_length)
    generator = prompt_generator_macs(spec, extra_cls_branch)
    return {
        "generator": 3 * generator,
        "text": 2 * (text.forward + text.backward(text_weight_grads)),
        "loss": 2 * train_loss_macs(spec),
    }


def score_image_macs(spec: BackboneSpec, text_length: int, bank_size: int, top_k: int, extra_cls_branch: bool = True) -> dict[str, int]:
    """Scoring one test image from cached features: generator, 2 text passes, maps, k-NN."""
    parts = {
        "generator": prompt_generator_macs(spec, extra_cls_branch),
        "text": 2 * text_macs(spec, text_length).forward,
    }
    parts.update(score_extra_macs(spec, bank_size, top_k))
    return parts


@dataclass(frozen=True)
class ProtocolShape:
    """One few-shot run: C classes × K shots, N test images, E epochs."""

    classes: int = 15
    shots: int = 1
    test_images: int = 1725
    epochs: int = 20
    manual_prompts: int = MVTEC_MANUAL_PROMPTS

    @property
    def train_images(self) -> int:
        return self.classes * self.shots


MVTEC_1SHOT = ProtocolShape()


def iipad_protocol_macs(spec: BackboneSpec, shape: ProtocolShape = MVTEC_1SHOT) -> dict[str, int]:
    """iipad: extract every image once (trunk shared), train on cached features with the truncated
    text context, one bank, one scoring pass."""
    length = truncated_length()
    bank = shape.train_images
    top_k = shape.shots
    generator = prompt_generator_macs(spec)
    return {
        "manual_prompts": shape.manual_prompts * text_macs(spec, spec.clip_config["text_cfg"]["context_length"]).forward,
        "extract": (shape.train_images + shape.test_images) * sum(extract_macs(spec, share_trunk=True).values()),
        "train": shape.epochs * shape.train_images * sum(train_step_macs(spec, length, text_weight_grads=False).values()),
        "bank": bank * (generator + 2 * text_macs(spec, length).forward),
        "score": shape.test_images * sum(score_image_macs(spec, length, bank, top_k).values()),
    }


def released_encoders_macs(spec: BackboneSpec) -> int:
    """The released code's frozen-encoder work for one image: the V-V pass, the Q-Former's own
    vision tower, the BERT part at batch 10."""
    return (
        sum(vv_clip_macs(spec).values())
        + qformer_vision_macs(spec.qformer)
        + qformer_bert_macs(spec.qformer, spec.num_patches + 1, batch=RELEASED_QFORMER_BATCH)
    )


def released_protocol_macs(spec: BackboneSpec, shape: ProtocolShape = MVTEC_1SHOT) -> dict[str, int]:
    """The released code's schedule (reference §4-5): every epoch re-runs the frozen encoders for
    each training step, each bank entry and each test image, with 77-token text passes whose
    backward also computes text-encoder weight gradients."""
    full = int(spec.clip_config["text_cfg"]["context_length"])
    bank = shape.train_images
    encoders = released_encoders_macs(spec)
    generator = prompt_generator_macs(spec)
    text = text_macs(spec, full).forward
    per_epoch_train = shape.train_images * (encoders + sum(train_step_macs(spec, full, text_weight_grads=True).values()))
    per_epoch_bank = bank * (encoders + generator + 2 * text)
    per_epoch_test = shape.test_images * (encoders + sum(score_image_macs(spec, full, bank, shape.shots).values()))
    return {
        "manual_prompts": shape.manual_prompts * text,
        "train": shape.epochs * per_epoch_train,
        "bank": shape.epochs * per_epoch_bank,
        "test": shape.epochs * per_epoch_test,
    }


def flop_table(spec: BackboneSpec, shape: ProtocolShape = MVTEC_1SHOT) -> dict[str, dict[str, float]]:
    """GFLOP per unit of work for each stage (the `docs/performance.md` table), with parts."""
    length = truncated_length()
    full = int(spec.clip_config["text_cfg"]["context_length"])

    def as_gflop(parts: dict[str, int]) -> dict[str, float]:
        table = {name: gflop(value) for name, value in parts.items()}
        table["total"] = gflop(sum(parts.values()))
        return table

    return {
        "extract_image_shared_trunk": as_gflop(extract_macs(spec, share_trunk=True)),
        "extract_image_own_trunk": as_gflop(extract_macs(spec, share_trunk=False)),
        "train_step_truncated": as_gflop(train_step_macs(spec, length, text_weight_grads=False)),
        "train_step_full_context": as_gflop(train_step_macs(spec, full, text_weight_grads=False)),
        "score_image": as_gflop(score_image_macs(spec, length, shape.train_images, shape.shots)),
        "text_pass_truncated": {"total": gflop(text_macs(spec, length).forward)},
        "text_pass_full": {"total": gflop(text_macs(spec, full).forward)},
        "protocol_iipad": as_gflop(iipad_protocol_macs(spec, shape)),
        "protocol_released": as_gflop(released_protocol_macs(spec, shape)),
    }
