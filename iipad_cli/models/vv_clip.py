"""Dual-path (original + V-V attention) forward over open_clip's `VisionTransformer`.

The released IIPAD code (AnomalyCLIP's DPAM, reference-implementation.md §1) turns blocks
`vv_start_layer..depth` into dual-path blocks:

- the original path is an unchanged CLIP block;
- the V-V path adds softmax(v·vᵀ/√d_h)·v, projected by the block's own out_proj, with no MLP, and
  its attention reads ln_1 of the *original* state, so x_vv only accumulates residuals on top of
  the state before the first dual block.

One forward returns everything `extract` stores, so each image goes through the ViT once.

Every block runs through this module's own forward (`plain_block`, `dual_path_block`), so the
matmuls follow the weights' dtype (bf16 under `--precision bf16`, see models/precision.py) while
the residual stream, the LayerNorms and the output projections stay in the input's dtype (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch import Tensor

from iipad_cli.models.precision import linear, quick_gelu_


@dataclass
class VisualFeatures:
    """Outputs of one dual-path forward for a batch of B images (P patches, CLS dropped).

    vv:        (B, len(vv_layers), P, embed_dim)   V-V path at the V-V layers, ln_post + proj
    mem:       (B, len(memory_layers), P, width)   original path at the memory layers, raw residual
    cls_token: (B, 2, embed_dim)                   E_v(x): [0] CLS·proj without ln_post (released
                                                   code), [1] ln_post(CLS)·proj (standard CLIP)
    trunk:     (B, 1 + P, width) or None           original-path state after `trunk_depth` blocks
    """

    vv: Tensor
    mem: Tensor
    cls_token: Tensor
    trunk: Tensor | None


def _qkv(block: ResidualAttentionBlock, x_norm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fused in-projection of nn.MultiheadAttention, split into (B, heads, N, head_dim) q, k, v.

    Runs in the weights' dtype (bf16 under `--precision bf16`, the LayerNorm output cast to it).
    """
    attn = block.attn
    batch, tokens, width = x_norm.shape
    heads = attn.num_heads
    qkv = linear(x_norm, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _merge_heads(block: ResidualAttentionBlock, heads_out: Tensor) -> Tensor:
    batch, _, tokens, _ = heads_out.shape
    merged = heads_out.transpose(1, 2).reshape(batch, tokens, -1)
    out_proj = block.attn.out_proj
    return linear(merged, out_proj.weight, out_proj.bias)


def _mlp(block: ResidualAttentionBlock, x_norm: Tensor) -> Tensor:
    """c_proj(act(c_fc(x))) in the weights' dtype; QuickGELU in place (bit-identical, fewer temporaries)."""
    mlp = block.mlp
    hidden = linear(x_norm, mlp.c_fc.weight, mlp.c_fc.bias)
    hidden = quick_gelu_(hidden) if isinstance(mlp.gelu, QuickGELU) else mlp.gelu(hidden)
    return linear(hidden, mlp.c_proj.weight, mlp.c_proj.bias)


def plain_block(block: ResidualAttentionBlock, x: Tensor) -> Tensor:
    """An unmodified CLIP block, x + attn(ln_1 x), then + mlp(ln_2 x), with the residual stream and
    LayerNorms in x's dtype (fp32) and the projections and attention in the weights' dtype."""
    q, k, v = _qkv(block, block.ln_1(x))
    x = x + block.ls_1(_merge_heads(block, F.scaled_dot_product_attention(q, k, v)))
    return x + block.ls_2(_mlp(block, block.ln_2(x)))


def dual_path_block(block: ResidualAttentionBlock, x_ori: Tensor) -> tuple[Tensor, Tensor]:
    """One dual block: returns (original-path output, V-V attention residual A_vv(ln_1 x_ori)).

    q, k, v come from one shared in-projection; the original path uses softmax(q·kᵀ)·v, the V-V
    path softmax(v·vᵀ)·v, both through the same out_proj.
    """
    q, k, v = _qkv(block, block.ln_1(x_ori))
    original_attn = _merge_heads(block, F.scaled_dot_product_attention(q, k, v))
    vv_attn = _merge_heads(block, F.scaled_dot_product_attention(v, v, v))
    x = x_ori + block.ls_1(original_attn)
    x = x + block.ls_2(_mlp(block, block.ln_2(x)))
    return x, block.ls_1(vv_attn)


def vv_forward(
    visual: VisionTransformer,
    images: Tensor,
    *,
    vv_start_layer: int,
    vv_layers: tuple[int, ...],
    memory_layers: tuple[int, ...],
    trunk_depth: int | None = None,
) -> VisualFeatures:
    """Run the dual-path ViT on a batch of preprocessed images (B, 3, H, W).

    Layer numbers are 1-based block indices. `trunk_depth` asks for the original-path state after
    that many blocks (the Q-Former's vision tower shares them when its weights are CLIP's).
    """
    blocks = list(visual.transformer.resblocks)
    x = visual._embeds(images)
    x_vv: Tensor | None = None
    vv_out: dict[int, Tensor] = {}
    mem_out: dict[int, Tensor] = {}
    trunk: Tensor | None = None
    for layer, block in enumerate(blocks, start=1):
        if layer < vv_start_layer:
            x_next = plain_block(block, x)
        else:
            x_next, vv_residual = dual_path_block(block, x)
            x_vv = (x if x_vv is None else x_vv) + vv_residual
        x = x_next
        if layer in vv_layers:
            assert x_vv is not None, "V-V layers must not precede vv_start_layer (BackboneSpec.validate)"
            vv_out[layer] = visual.ln_post(x_vv[:, 1:]) @ visual.proj
        if layer in memory_layers:
            mem_out[layer] = x[:, 1:]
        if trunk_depth is not None and layer == trunk_depth:
            trunk = x
    cls_raw = x[:, 0]
    cls_token = torch.stack([cls_raw @ visual.proj, visual.ln_post(cls_raw) @ visual.proj], dim=1)
    return VisualFeatures(
        vv=torch.stack([vv_out[layer] for layer in vv_layers], dim=1),
        mem=torch.stack([mem_out[layer] for layer in memory_layers], dim=1),
        cls_token=cls_token,
        trunk=trunk,
    )
