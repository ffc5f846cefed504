"""Frozen encoders against independent computations: dual-path V-V CLIP and the prompt text encoder."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, _build_vision_tower
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from iipad_cli.models.registry import build_clip, get_spec
from iipad_cli.models.text import EOT_TOKEN_ID, PAD_TOKEN_ID, SOT_TOKEN_ID, PromptTextEncoder
from iipad_cli.models.vv_clip import vv_forward


def _perturb_parameters(module: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Random values for every parameter (LayerNorm weights near 1), so biases and affines matter.

    Buffers (the text tower's causal mask) are left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            is_norm_weight = parameter.ndim == 1 and "ln" in name and name.endswith("weight")
            parameter.copy_(1.0 + 0.1 * noise if is_norm_weight else scale * noise)


@pytest.fixture(scope="module")
def clip() -> CLIP:
    model = build_clip(get_spec("tiny"))
    _perturb_parameters(model, seed=11)
    return model.eval().requires_grad_(False)


def _images(batch: int, size: int = 224, seed: int = 2) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _plain_states(visual: VisionTransformer, images: Tensor) -> list[Tensor]:
    """[x_0, x_1, ..., x_depth]: the embedded input and the state after each unmodified block."""
    states = [visual._embeds(images)]
    for block in visual.transformer.resblocks:
        states.append(block(states[-1]))
    return states


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _vv_residual(block: nn.Module, x_ori: Tensor) -> Tensor:
    """reference-implementation.md §1: softmax(v·vᵀ/√d_h)·v per head on ln_1(x_ori), through out_proj."""
    attn = block.attn
    width = x_ori.shape[-1]
    heads = attn.num_heads
    head_dim = width // heads
    w_v = attn.in_proj_weight[2 * width :]
    b_v = attn.in_proj_bias[2 * width :]
    v = _layer_norm(x_ori, block.ln_1) @ w_v.T + b_v
    outputs = []
    for head in range(heads):
        v_h = v[..., head * head_dim : (head + 1) * head_dim]
        weights = torch.softmax(v_h @ v_h.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        outputs.append(weights @ v_h)
    return torch.cat(outputs, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias


def _run(visual: VisionTransformer, images: Tensor, spec_id: str = "tiny"):
    spec = get_spec(spec_id)
    return vv_forward(
        visual,
        images,
        vv_start_layer=spec.vv_start_layer,
        vv_layers=spec.vv_layers,
        memory_layers=spec.memory_layers,
        trunk_depth=spec.trunk_depth,
    )


def test_original_path_equals_plain_open_clip(clip: CLIP) -> None:
    spec = get_spec("tiny")
    images = _images(2)
    with torch.no_grad():
        features = _run(clip.visual, images)
        states = _plain_states(clip.visual, images)
        encoded = clip.encode_image(images)
    assert (features.cls_token[:, 1] - encoded).abs().max().item() <= 1e-6
    assert (features.cls_token[:, 0] - states[-1][:, 0] @ clip.visual.proj).abs().max().item() <= 1e-6
    for index, layer in enumerate(spec.memory_layers):
        assert (features.mem[:, index] - states[layer][:, 1:]).abs().max().item() <= 1e-6
    assert features.trunk is not None
    assert (features.trunk - states[spec.trunk_depth]).abs().max().item() <= 1e-6
    assert features.mem.shape == (2, len(spec.memory_layers), spec.num_patches, spec.vision_width)


def test_vv_path_equals_written_out_dual_path(clip: CLIP) -> None:
    spec = get_spec("tiny")
    visual = clip.visual
    blocks = list(visual.transformer.resblocks)
    images = _images(2)
    with torch.no_grad():
        features = _run(visual, images)
        states = _plain_states(visual, images)
        x_vv = states[spec.vv_start_layer - 1]
        expected: dict[int, Tensor] = {}
        for layer in range(spec.vv_start_layer, spec.vision_depth + 1):
            x_vv = x_vv + _vv_residual(blocks[layer - 1], states[layer - 1])
            expected[layer] = _layer_norm(x_vv[:, 1:], visual.ln_post) @ visual.proj
    assert features.vv.shape == (2, len(spec.vv_layers), spec.num_patches, spec.embed_dim)
    for index, layer in enumerate(spec.vv_layers):
        assert (features.vv[:, index] - expected[layer]).abs().max().item() <= 1e-5


def _token_ids(batch: int, length: int, seed: int = 4) -> Tensor:
    # Ordinary BPE ids (below SOT/EOT), so open_clip's argmax pooling finds the EOT.
    return torch.randint(1, SOT_TOKEN_ID, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_truncated_text_encoder_equals_open_clip_77_tokens(clip: CLIP) -> None:
    encoder = PromptTextEncoder(clip)
    batch, length = 3, 6
    ids = _token_ids(batch, length)
    context = clip.positional_embedding.shape[0]
    text = torch.full((batch, context), PAD_TOKEN_ID, dtype=torch.long)
    text[:, 0] = SOT_TOKEN_ID
    text[:, 1 : length + 1] = ids
    text[:, length + 1] = EOT_TOKEN_ID
    captured: list[Tensor] = []
    hook = clip.ln_final.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        with torch.no_grad():
            expected_embedding = clip.encode_text(text)
    finally:
        hook.remove()
    expected_tokens = captured[0][:, 1 : length + 1]
    prompts = clip.token_embedding.weight[ids]
    with torch.no_grad():
        embedding, tokens = encoder(prompts)
        full_embedding, full_tokens = encoder(prompts, context="full")
    assert (embedding - expected_embedding).abs().max().item() <= 1e-5
    assert (tokens - expected_tokens).abs().max().item() <= 1e-5
    assert (embedding - full_embedding).abs().max().item() <= 1e-5
    assert (tokens - full_tokens).abs().max().item() <= 1e-5


def test_gradients_reach_prompts_and_no_encoder_parameter() -> None:
    model = build_clip(get_spec("tiny"))
    _perturb_parameters(model, seed=12)
    encoder = PromptTextEncoder(model)
    prompts = torch.randn(2, 4, get_spec("tiny").text_width, requires_grad=True)
    embedding, tokens = encoder(prompts)
    (embedding.square().sum() + tokens.square().sum()).backward()
    assert prompts.grad is not None and prompts.grad.abs().sum().item() > 0
    text_parameters = list(encoder.parameters())
    assert text_parameters and all(not parameter.requires_grad for parameter in text_parameters)
    assert all(parameter.grad is None for parameter in model.parameters())


def _vit_l_visual() -> VisionTransformer:
    cfg = get_spec("vit-l-14").clip_config
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg["quick_gelu"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in visual.named_parameters():
            if parameter.ndim == 1 and "ln" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                # N(0, 0.02), never open_clip's tiny init: denormals make CPU matmuls ~8x slower.
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return visual.eval().requires_grad_(False)


def _scaled_error(got: Tensor, reference: Tensor) -> float:
    """max|Δ| in units of the reference's largest magnitude."""
    return (got - reference).abs().max().item() / max(1.0, reference.abs().max().item())


@pytest.mark.slow
def test_vit_l_14_original_path_equals_plain_open_clip() -> None:
    """Same check at full size. Residual states there reach |x| ≈ 13, where one fp32 ulp is ~1e-6,
    so the 1e-6 bound is taken relative to each tensor's largest magnitude (measured: ≤ 6.5e-7)."""
    spec = get_spec("vit-l-14")
    visual = _vit_l_visual()
    images = _images(1)
    with torch.no_grad():
        features = _run(visual, images, "vit-l-14")
        states = _plain_states(visual, images)
        pooled = visual(images)
    assert _scaled_error(features.cls_token[:, 1], pooled) <= 1e-6
    for index, layer in enumerate(spec.memory_layers):
        assert _scaled_error(features.mem[:, index], states[layer][:, 1:]) <= 1e-6
    assert features.trunk is not None
    assert _scaled_error(features.trunk, states[spec.trunk_depth]) <= 1e-6
