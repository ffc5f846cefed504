"""Q-Former: checkpoint-compatible key names, strict loading, an independent forward, trunk sharing."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from iipad_cli.config import QFormerConfig
from iipad_cli.errors import IipadError
from iipad_cli.checkpoints import export_weights, load_backbone, load_qformer_state_dict
from iipad_cli.models.qformer import QFormer, trunk_matches_clip
from iipad_cli.models.registry import build_random_backbone, get_spec

# The checkpoint key families of `Salesforce/blipdiffusion` qformer/pytorch_model.bin (backbones.md).
KEY_FAMILIES = [
    r"query_tokens",
    r"embeddings\.(word_embeddings|position_embeddings|LayerNorm)\.(weight|bias)",
    r"embeddings\.position_ids",
    r"visual_encoder\.embeddings\.(class_embedding|position_embedding|patch_embedding\.weight)",
    r"visual_encoder\.(pre_layernorm|post_layernorm)\.(weight|bias)",
    r"visual_encoder\.encoder\.layers\.\d+\.(layer_norm1|layer_norm2|self_attn\.qkv|self_attn\.projection|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
    r"encoder\.layer\.\d+\.(attention|crossattention)\.attention\.(query|key|value)\.(weight|bias)",
    r"encoder\.layer\.\d+\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
    r"encoder\.layer\.\d+\.(intermediate|intermediate_query)\.dense\.(weight|bias)",
    r"encoder\.layer\.\d+\.(output|output_query)\.(dense|LayerNorm)\.(weight|bias)",
    r"proj_layer\.(dense1|dense2|LayerNorm)\.(weight|bias)",
]


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep iipad's caches (the digest cache among them) out of the user's home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _images(batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _perturbed_qformer(config: QFormerConfig, seed: int = 3) -> QFormer:
    """A Q-Former whose every float tensor is random, so biases and LayerNorm affines matter."""
    model = QFormer(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            is_norm_weight = ("LayerNorm" in name or "layernorm" in name or "layer_norm" in name) and name.endswith("weight")
            tensor.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.05 * noise)
    return model.eval()


# --- independent written-out forward, straight from the state dict ------------------------------


def _ln(x: Tensor, sd: dict[str, Tensor], prefix: str, eps: float) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]


def _lin(x: Tensor, sd: dict[str, Tensor], prefix: str) -> Tensor:
    return x @ sd[f"{prefix}.weight"].T + sd[f"{prefix}.bias"]


def _heads_loop(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """softmax(q_h k_hᵀ/√d_h) v_h per head, concatenated; q (N, D), k and v (L, D)."""
    head_dim = q.shape[-1] // heads
    outputs = []
    for head in range(heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(head_dim)
        outputs.append(torch.softmax(scores, dim=-1) @ v[:, cols])
    return torch.cat(outputs, dim=-1)


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _exact_gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _reference_vision(image: Tensor, sd: dict[str, Tensor], c: QFormerConfig) -> Tensor:
    p, width = c.patch_size, c.vision_width
    grid = c.image_size // p
    patches = image.reshape(3, grid, p, grid, p).permute(1, 3, 0, 2, 4).reshape(grid * grid, 3 * p * p)
    kernel = sd["visual_encoder.embeddings.patch_embedding.weight"].reshape(width, -1)
    x = torch.cat([sd["visual_encoder.embeddings.class_embedding"].reshape(1, width), patches @ kernel.T])
    x = x + sd["visual_encoder.embeddings.position_embedding"].reshape(-1, width)
    x = _ln(x, sd, "visual_encoder.pre_layernorm", c.vision_ln_eps)
    for index in range(c.vision_layers):
        pre = f"visual_encoder.encoder.layers.{index}"
        q, k, v = _lin(_ln(x, sd, f"{pre}.layer_norm1", c.vision_ln_eps), sd, f"{pre}.self_attn.qkv").chunk(3, dim=-1)
        x = x + _lin(_heads_loop(q, k, v, c.vision_heads), sd, f"{pre}.self_attn.projection")
        hidden = _quick_gelu(_lin(_ln(x, sd, f"{pre}.layer_norm2", c.vision_ln_eps), sd, f"{pre}.mlp.fc1"))
        x = x + _lin(hidden, sd, f"{pre}.mlp.fc2")
    return _ln(x, sd, "visual_encoder.post_layernorm", c.vision_ln_eps)


def _reference_bert_attention(x: Tensor, context: Tensor, sd: dict[str, Tensor], pre: str, c: QFormerConfig) -> Tensor:
    q = _lin(x, sd, f"{pre}.attention.query")
    k = _lin(context, sd, f"{pre}.attention.key")
    v = _lin(context, sd, f"{pre}.attention.value")
    mixed = _heads_loop(q, k, v, c.heads)
    return _ln(_lin(mixed, sd, f"{pre}.output.dense") + x, sd, f"{pre}.output.LayerNorm", c.ln_eps)


def _reference_ffn(x: Tensor, sd: dict[str, Tensor], intermediate: str, output: str, c: QFormerConfig) -> Tensor:
    hidden = _exact_gelu(_lin(x, sd, f"{intermediate}.dense"))
    return _ln(_lin(hidden, sd, f"{output}.dense") + x, sd, f"{output}.LayerNorm", c.ln_eps)


def _reference_qformer(image: Tensor, sd: dict[str, Tensor], c: QFormerConfig) -> Tensor:
    """One image -> (M, hidden), following reference-implementation.md §2 step by step."""
    image_tokens = _reference_vision(image, sd, c)
    ids = list(c.text_ids)
    text = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][: len(ids)]
    x = torch.cat([sd["query_tokens"][0], text])
    x = _ln(x, sd, "embeddings.LayerNorm", c.ln_eps)
    m = c.num_query_tokens
    for index in range(c.layers):
        pre = f"encoder.layer.{index}"
        x = _reference_bert_attention(x, x, sd, f"{pre}.attention", c)
        queries = _reference_bert_attention(x[:m], image_tokens, sd, f"{pre}.crossattention", c)
        queries = _reference_ffn(queries, sd, f"{pre}.intermediate_query", f"{pre}.output_query", c)
        text_part = _reference_ffn(x[m:], sd, f"{pre}.intermediate", f"{pre}.output", c)
        x = torch.cat([queries, text_part])
    z = x[:m]
    hidden = _quick_gelu(_lin(_ln(z, sd, "proj_layer.LayerNorm", c.ln_eps), sd, "proj_layer.dense1"))
    return z + _lin(hidden, sd, "proj_layer.dense2")


# --- tests ---------------------------------------------------------------------------------------


def test_state_dict_uses_checkpoint_key_names() -> None:
    keys = QFormer(get_spec("tiny").qformer).state_dict().keys()
    unknown = [key for key in keys if not any(re.fullmatch(family, key) for family in KEY_FAMILIES)]
    assert unknown == []
    assert "embeddings.position_ids" in keys
    # Every family is represented, so a renamed module cannot hide behind the regexes.
    for family in KEY_FAMILIES:
        assert any(re.fullmatch(family, key) for key in keys), family


def test_forward_equals_written_out_computation() -> None:
    config = get_spec("tiny").qformer
    model = _perturbed_qformer(config)
    images = _images(2)
    with torch.no_grad():
        out = model(images)
    sd = {key: value.detach() for key, value in model.state_dict().items()}
    assert out.shape == (2, config.num_query_tokens, config.hidden)
    for row in range(2):
        expected = _reference_qformer(images[row], sd, config)
        assert (out[row] - expected).abs().max().item() <= 1e-5


def test_output_depends_on_the_image_and_the_fixed_text_ids() -> None:
    """Z reads the image (through cross-attention) and the configured text ids, not constants."""
    config = get_spec("tiny").qformer
    model = _perturbed_qformer(config)
    other_text = QFormer(replace(config, text_ids=(101, 2000, 102))).eval()
    other_text.load_state_dict(model.state_dict())
    images = _images(1)
    with torch.no_grad():
        assert not torch.allclose(model(images), other_text(images))
        assert not torch.allclose(model(images), model(_images(1, seed=9)))


@pytest.mark.parametrize("qformer_format", ["bin", "safetensors"])
def test_checkpoint_round_trip_through_user_loader(tmp_path: Path, qformer_format: str) -> None:
    spec = get_spec("tiny")
    original = build_random_backbone(spec, seed=5)
    paths = export_weights(original, tmp_path / "weights", qformer_format=qformer_format)
    loaded = load_backbone(spec, weights_dir=tmp_path / "weights")
    assert loaded.trunk_shared
    assert set(loaded.weights) == {str(paths.clip), str(paths.qformer)}
    images = _images(2)
    with torch.no_grad():
        expected = original.encode_images(images, share_trunk=False).qformer
        got = loaded.encode_images(images, share_trunk=False).qformer
    assert torch.equal(expected, got)


def _write_bad_checkpoint(tmp_path: Path, edit) -> Path:
    backbone = build_random_backbone(get_spec("tiny"))
    paths = export_weights(backbone, tmp_path / "weights", qformer_format="bin")
    state = load_qformer_state_dict(paths.qformer)
    edit(state)
    torch.save(state, paths.qformer)
    return paths.qformer


def _load_error(tmp_path: Path) -> str:
    with pytest.raises(IipadError) as info:
        load_backbone(get_spec("tiny"), weights_dir=tmp_path / "weights")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_key_refused(tmp_path: Path) -> None:
    path = _write_bad_checkpoint(tmp_path, lambda sd: sd.pop("encoder.layer.1.crossattention.attention.key.bias"))
    message = _load_error(tmp_path)
    assert str(path) in message and "missing" in message
    assert "encoder.layer.1.crossattention.attention.key.bias" in message


def test_extra_key_refused(tmp_path: Path) -> None:
    path = _write_bad_checkpoint(tmp_path, lambda sd: sd.update({"text_proj.weight": torch.zeros(3, 3)}))
    message = _load_error(tmp_path)
    assert str(path) in message and "unexpected" in message and "text_proj.weight" in message


def test_misshaped_key_refused(tmp_path: Path) -> None:
    def widen(sd: dict[str, Tensor]) -> None:
        sd["query_tokens"] = torch.zeros(1, 8, 32)

    path = _write_bad_checkpoint(tmp_path, widen)
    message = _load_error(tmp_path)
    assert str(path) in message and "mis-shaped" in message and "query_tokens" in message


def test_many_bad_keys_are_truncated_with_a_count(tmp_path: Path) -> None:
    def drop_decoder(sd: dict[str, Tensor]) -> None:
        for key in [key for key in sd if key.startswith("encoder.layer.")]:
            del sd[key]

    _write_bad_checkpoint(tmp_path, drop_decoder)
    message = _load_error(tmp_path)
    total = sum(1 for key in QFormer(get_spec("tiny").qformer).state_dict() if key.startswith("encoder.layer."))
    assert f"missing {total} key(s)" in message
    assert f"(+{total - 8} more)" in message


def test_unreadable_checkpoint_names_the_file(tmp_path: Path) -> None:
    for name in ("broken.bin", "broken.safetensors"):
        path = tmp_path / name
        path.write_bytes(b"not a checkpoint")
        with pytest.raises(IipadError, match=re.escape(str(path))):
            load_qformer_state_dict(path)


def test_tied_trunk_shared_path_equals_separate_path(tiny_backbone) -> None:
    assert tiny_backbone.trunk_shared
    images = _images(2)
    with torch.no_grad():
        shared = tiny_backbone.encode_images(images, share_trunk=True).qformer
        separate = tiny_backbone.encode_images(images, share_trunk=False).qformer
    assert (shared - separate).abs().max().item() <= 1e-5


def test_untied_trunk_is_detected() -> None:
    untied = build_random_backbone(get_spec("tiny"), tie_trunk=False)
    assert not untied.trunk_shared
    assert not trunk_matches_clip(untied.qformer, untied.clip.visual)
    with pytest.raises(ValueError):
        untied.encode_images(_images(1), share_trunk=True)


def test_one_changed_weight_breaks_trunk_sharing() -> None:
    backbone = build_random_backbone(get_spec("tiny"))
    assert trunk_matches_clip(backbone.qformer, backbone.clip.visual)
    with torch.no_grad():
        backbone.qformer.visual_encoder.encoder.layers[-1].mlp.fc2.bias[0] += 1e-6
    assert not trunk_matches_clip(backbone.qformer, backbone.clip.visual)


def _expected_parameter_count(c: QFormerConfig) -> int:
    """Written out from backbones.md's architecture description (not from the module tree)."""
    w, h, i = c.vision_width, c.hidden, c.intermediate
    patches = (c.image_size // c.patch_size) ** 2
    vision = 3 * c.patch_size**2 * w + w + (patches + 1) * w + 2 * (2 * w)
    vision += c.vision_layers * (2 * 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * c.vision_mlp + c.vision_mlp) + (c.vision_mlp * w + w))
    embeddings = c.num_query_tokens * h + c.vocab_size * h + c.max_positions * h + 2 * h
    self_attention = 4 * (h * h + h) + 2 * h
    cross_attention = 2 * (h * h + h) + 2 * (w * h + h) + 2 * h
    ffn = (h * i + i) + (i * h + h) + 2 * h
    layer = self_attention + cross_attention + 2 * ffn
    projection = (h * 4 * h + 4 * h) + (4 * h * h + h) + 2 * h
    return vision + embeddings + c.layers * layer + projection


@pytest.mark.slow
def test_full_size_parameter_count() -> None:
    config = get_spec("vit-l-14").qformer
    model = QFormer(config)
    count = sum(parameter.numel() for parameter in model.parameters())
    assert count == _expected_parameter_count(config)
    assert abs(count - 494e6) / 494e6 < 0.01
    vision = sum(parameter.numel() for parameter in model.visual_encoder.parameters())
    assert abs(vision - 290.6e6) / 290.6e6 < 0.001
