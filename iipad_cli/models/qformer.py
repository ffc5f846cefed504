"""Plain-torch BLIP-Diffusion Q-Former (vision tower + BERT-style querying transformer).

A re-implementation instead of diffusers/transformers, whose BLIP-Diffusion code is deprecated and
breaks with current releases (backbones.md). Module and parameter names follow the released
`Salesforce/blipdiffusion` `qformer/pytorch_model.bin` exactly, so that checkpoint loads with
`strict=True`. Frozen inference only: no dropout, no attention masks (the text input is always the
three unpadded ids of "[CLS] object [SEP]", so every mask is all ones).

What IIPAD reads from it, for each image: the 16 query outputs after `proj_layer`, the tokens Z in
the CLIP text encoder's token-embedding space.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from iipad_cli.config import QFormerConfig
from iipad_cli.errors import IipadError
from iipad_cli.models.precision import CastingLinear, quick_gelu_


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


# ---------------------------------------------------------------------------------------------
# Vision tower (BLIP-2 ViT = CLIP ViT-L/14 blocks with a fused qkv Linear)


class VisionEmbeddings(nn.Module):
    """Patch conv (no bias) + CLS token + learned absolute positions; shapes as in the checkpoint."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        width = config.vision_width
        positions = (config.image_size // config.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, positions, width))

    def forward(self, images: Tensor) -> Tensor:
        patches = self.patch_embedding(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.heads = config.vision_heads
        self.qkv = CastingLinear(config.vision_width, 3 * config.vision_width)
        self.projection = CastingLinear(config.vision_width, config.vision_width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_split_heads(part, self.heads) for part in self.qkv(x).chunk(3, dim=-1))
        return self.projection(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class VisionMLP(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.fc1 = CastingLinear(config.vision_width, config.vision_mlp)
        self.fc2 = CastingLinear(config.vision_mlp, config.vision_width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu_(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-LN transformer block, the same computation as an open_clip `ResidualAttentionBlock`."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.vision_width, eps=config.vision_ln_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.vision_width, eps=config.vision_ln_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.vision_layers))


class VisionTower(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.vision_width, eps=config.vision_ln_eps)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.vision_width, eps=config.vision_ln_eps)

    def trunk(self, images: Tensor) -> Tensor:
        """Residual state after the last block, before `post_layernorm` (what CLIP can share)."""
        x = self.pre_layernorm(self.embeddings(images))
        for layer in self.encoder.layers:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# Querying transformer (BERT-base layers with query-only cross-attention)


class TextEmbeddings(nn.Module):
    """Query tokens followed by word + absolute position embeddings of the text ids, then LayerNorm."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.ln_eps)
        # Persistent: the released checkpoint stores it, and strict loading expects it.
        self.register_buffer("position_ids", torch.arange(config.max_positions).expand(1, -1).clone())

    def forward(self, input_ids: Tensor, query_tokens: Tensor) -> Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        text = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        queries = query_tokens.expand(input_ids.shape[0], -1, -1).to(text.dtype)
        return self.LayerNorm(torch.cat([queries, text], dim=1))


class MultiHeadAttention(nn.Module):
    """BERT attention projections; keys/values read `kv_width`-wide states (image tokens for cross)."""

    def __init__(self, config: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = config.heads
        self.query = CastingLinear(config.hidden, config.hidden)
        self.key = CastingLinear(kv_width, config.hidden)
        self.value = CastingLinear(kv_width, config.hidden)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = _split_heads(self.query(x), self.heads)
        k = _split_heads(self.key(context), self.heads)
        v = _split_heads(self.value(context), self.heads)
        return _merge_heads(F.scaled_dot_product_attention(q, k, v))


class AttentionOutput(nn.Module):
    """Post-LN residual: LayerNorm(dense(h) + input)."""

    def __init__(self, config: QFormerConfig, width: int) -> None:
        super().__init__()
        self.dense = CastingLinear(width, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.ln_eps)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class Attention(nn.Module):
    def __init__(self, config: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(config, kv_width)
        self.output = AttentionOutput(config, config.hidden)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        return self.output(self.attention(x, context), x)


class Intermediate(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = CastingLinear(config.hidden, config.intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention over queries + text, cross-attention to the image for the queries only,
    then separate feed-forward networks for query and text positions."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.attention = Attention(config, config.hidden)
        self.crossattention = Attention(config, config.vision_width)
        self.intermediate = Intermediate(config)
        self.output = AttentionOutput(config, config.intermediate)
        self.intermediate_query = Intermediate(config)
        self.output_query = AttentionOutput(config, config.intermediate)

    def forward(self, x: Tensor, image: Tensor, num_queries: int) -> Tensor:
        x = self.attention(x, x)
        queries = self.crossattention(x[:, :num_queries], image)
        queries = self.output_query(self.intermediate_query(queries), queries)
        text = x[:, num_queries:]
        text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)


class QFormerEncoder(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config) for _ in range(config.layers))


class ProjLayer(nn.Module):
    """x + dense2(QuickGELU(dense1(LayerNorm(x)))), hidden width 4·hidden as in diffusers' ProjLayer."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense1 = CastingLinear(config.hidden, 4 * config.hidden)
        self.dense2 = CastingLinear(4 * config.hidden, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.ln_eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dense2(quick_gelu_(self.dense1(self.LayerNorm(x))))


class QFormer(nn.Module):
    """BLIP-Diffusion Q-Former: images (B, 3, S, S) -> object tokens Z (B, M, hidden)."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden))
        self.embeddings = TextEmbeddings(config)
        self.visual_encoder = VisionTower(config)
        self.encoder = QFormerEncoder(config)
        self.proj_layer = ProjLayer(config)
        self.register_buffer("text_ids", torch.tensor([list(config.text_ids)], dtype=torch.long), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Run the Q-Former's own vision tower, then the querying transformer."""
        return self.forward_from_trunk(self.visual_encoder.trunk(images))

    def forward_from_trunk(self, trunk_state: Tensor) -> Tensor:
        """Querying transformer on a shared trunk state (B, 1+P, vision_width) before post_layernorm.

        With tied weights the CLIP original path after `vision_layers` blocks is exactly this
        state, so the V-V pass feeds the Q-Former without a second ViT pass (design.md §4).
        """
        image = self.visual_encoder.post_layernorm(trunk_state)
        num_queries = self.query_tokens.shape[1]
        x = self.embeddings(self.text_ids.expand(image.shape[0], -1), self.query_tokens)
        for layer in self.encoder.layer:
            x = layer(x, image, num_queries)
        return self.proj_layer(x[:, :num_queries])

    def tie_vision_to_clip(self, visual: VisionTransformer) -> None:
        """Copy the CLIP visual tower's weights into the vision tower (the blocks both have)."""
        with torch.no_grad():
            for _, own, clip_tensor in _vision_pairs(self, visual):
                own.copy_(clip_tensor.reshape(own.shape))


def _vision_pairs(qformer: QFormer, visual: VisionTransformer) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(name, Q-Former vision tensor, corresponding CLIP tensor) for every shared vision weight.

    The CLIP tensor keeps its own shape (class/position embeddings lack the batch axis in CLIP);
    callers reshape when the element counts agree.
    """
    tower = qformer.visual_encoder
    embeddings = tower.embeddings
    yield "class_embedding", embeddings.class_embedding, visual.class_embedding
    yield "position_embedding", embeddings.position_embedding, visual.positional_embedding
    yield "patch_embedding.weight", embeddings.patch_embedding.weight, visual.conv1.weight
    yield "pre_layernorm.weight", tower.pre_layernorm.weight, visual.ln_pre.weight
    yield "pre_layernorm.bias", tower.pre_layernorm.bias, visual.ln_pre.bias
    blocks = list(visual.transformer.resblocks)
    for index, layer in enumerate(tower.encoder.layers):
        prefix = f"encoder.layers.{index}"
        if index >= len(blocks):
            raise ValueError(f"the Q-Former vision tower has more blocks than the CLIP tower ({len(blocks)})")
        block = blocks[index]
        pairs = {
            "layer_norm1.weight": (layer.layer_norm1.weight, block.ln_1.weight),
            "layer_norm1.bias": (layer.layer_norm1.bias, block.ln_1.bias),
            "self_attn.qkv.weight": (layer.self_attn.qkv.weight, block.attn.in_proj_weight),
            "self_attn.qkv.bias": (layer.self_attn.qkv.bias, block.attn.in_proj_bias),
            "self_attn.projection.weight": (layer.self_attn.projection.weight, block.attn.out_proj.weight),
            "self_attn.projection.bias": (layer.self_attn.projection.bias, block.attn.out_proj.bias),
            "layer_norm2.weight": (layer.layer_norm2.weight, block.ln_2.weight),
            "layer_norm2.bias": (layer.layer_norm2.bias, block.ln_2.bias),
            "mlp.fc1.weight": (layer.mlp.fc1.weight, block.mlp.c_fc.weight),
            "mlp.fc1.bias": (layer.mlp.fc1.bias, block.mlp.c_fc.bias),
            "mlp.fc2.weight": (layer.mlp.fc2.weight, block.mlp.c_proj.weight),
            "mlp.fc2.bias": (layer.mlp.fc2.bias, block.mlp.c_proj.bias),
        }
        for name, (own, clip_tensor) in pairs.items():
            yield f"{prefix}.{name}", own, clip_tensor


def trunk_matches_clip(qformer: QFormer, visual: VisionTransformer) -> bool:
    """True iff every shared vision weight equals CLIP's exactly and the LayerNorm eps agree.

    Only then is CLIP's original-path state after `vision_layers` blocks the Q-Former's trunk.
    """
    if len(qformer.visual_encoder.encoder.layers) > len(visual.transformer.resblocks):
        return False
    if visual.ln_pre.eps != qformer.config.vision_ln_eps:
        return False
    for _, own, clip_tensor in _vision_pairs(qformer, visual):
        if own.numel() != clip_tensor.numel():
            return False
        if not torch.equal(own.detach().reshape(-1), clip_tensor.detach().to(own.device).reshape(-1)):
            return False
    return True


def _key_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} (+{len(keys) - limit} more)"


def validate_qformer_state_dict(model: QFormer, state_dict: dict[str, Tensor], source: Path) -> None:
    """Refuse, in one line naming `source`, any missing, unexpected or mis-shaped key.

    Needs only the model's key names and shapes, so a model on the meta device will do.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{key} {tuple(state_dict[key].shape)}≠{tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    problems = [
        f"{label} {len(keys)} key(s): {_key_list(keys)}"
        for label, keys in (("missing", missing), ("unexpected", extra), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise IipadError(f"{source}: not a Q-Former checkpoint for this backbone; " + "; ".join(problems))


def load_qformer_weights(model: QFormer, state_dict: dict[str, Tensor], source: Path) -> None:
    """Strict load, after `validate_qformer_state_dict` has reported any key problem in one line."""
    validate_qformer_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
