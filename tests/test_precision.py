"""`--precision`: device detection, what bf16 casts and what stays fp32, and the bf16 feature error
bounded against independent fp32 computations (written out here and in test_encoders/test_qformer)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_encoders import _layer_norm, _vv_residual
from test_qformer import _reference_qformer
from torch import Tensor, nn

from iipad_cli.devices import bf16_units, cpu_flags, resolve_precision
from iipad_cli.errors import IipadError
from iipad_cli.models.backbone import Backbone
from iipad_cli.models.precision import CastingLinear, quick_gelu_
from iipad_cli.models.registry import build_random_backbone, get_spec

CPU = torch.device("cpu")

# Documented bound (docs/performance.md, docs/protocol.md) of bf16 features against fp32 on `tiny`:
# relative error ‖bf16 − fp32‖ / ‖fp32‖ per feature, and the worst per-token cosine similarity.
TINY_BF16_MAX_RELATIVE_ERROR = 1e-3
TINY_BF16_MIN_TOKEN_COSINE = 0.99999


# --- device detection -----------------------------------------------------------------------------


def test_cpu_flags_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(cpuinfo) == frozenset({"fpu", "sse2", "avx512f", "avx512_bf16"})
    assert cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
        ({"avx2", "amx_tile", "amx_bf16"}, "bf16"),
        ({"avx2", "avx512f", "avx512_vnni"}, "fp32"),
        (set(), "fp32"),
    ],
)
def test_auto_precision_on_cpu_follows_the_bf16_flags(flags: set[str], expected: str) -> None:
    assert resolve_precision("auto", CPU, frozenset(flags)) == expected


def test_explicit_precision_is_honoured_and_unknown_refused() -> None:
    assert resolve_precision("fp32", CPU, frozenset({"amx_bf16"})) == "fp32"
    assert resolve_precision("bf16", CPU, frozenset()) == "bf16"
    with pytest.raises(IipadError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", CPU, frozenset())


@pytest.mark.parametrize(("capability", "expected"), [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_precision_on_cuda_needs_capability_8(monkeypatch: pytest.MonkeyPatch, capability, expected) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", torch.device("cuda"), frozenset()) == expected
    assert (bf16_units(torch.device("cuda")) is not None) == (expected == "bf16")


def test_auto_precision_on_mps_is_fp32() -> None:
    assert resolve_precision("auto", torch.device("mps"), frozenset({"amx_bf16"})) == "fp32"


# --- what bf16 casts ------------------------------------------------------------------------------


def test_quick_gelu_in_place_is_bit_identical() -> None:
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        values = x.to(dtype)
        expected = values * torch.sigmoid(1.702 * values)
        with torch.no_grad():
            assert torch.equal(quick_gelu_(values.clone()), expected)


def test_quick_gelu_keeps_the_input_when_a_gradient_needs_it() -> None:
    x = torch.randn(8, 5, requires_grad=True)
    y = quick_gelu_(x)
    y.sum().backward()
    sigmoid = torch.sigmoid(1.702 * x.detach())
    expected = sigmoid + x.detach() * 1.702 * sigmoid * (1 - sigmoid)
    assert x.grad is not None and torch.allclose(x.grad, expected, atol=1e-6)


def test_casting_linear_takes_an_input_of_another_dtype() -> None:
    layer = CastingLinear(4, 3).to(torch.bfloat16)
    x = torch.randn(2, 4)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x.bfloat16(), layer.weight, layer.bias))


@pytest.fixture(scope="module")
def backbones() -> tuple[Backbone, Backbone]:
    """`tiny` in fp32 and the same seeded weights with bf16 matmuls."""
    spec = get_spec("tiny")
    return build_random_backbone(spec), build_random_backbone(spec).set_precision("bf16")


def _float_parameters(module: nn.Module) -> dict[str, torch.dtype]:
    return {name: tensor.dtype for name, tensor in module.state_dict().items() if tensor.is_floating_point()}


def test_bf16_casts_only_the_block_matmul_weights(backbones: tuple[Backbone, Backbone]) -> None:
    _, bf16 = backbones
    assert bf16.precision == "bf16"
    for name, dtype in _float_parameters(bf16.clip).items():
        in_block_linear = name.startswith("visual.transformer.resblocks.") and (".attn." in name or ".mlp." in name)
        assert dtype == (torch.bfloat16 if in_block_linear else torch.float32), name
    for name, dtype in _float_parameters(bf16.qformer).items():
        vision_linear = name.startswith("visual_encoder.encoder.layers.") and ("self_attn" in name or ".mlp." in name)
        bert_linear = name.startswith("encoder.layer.") and "LayerNorm" not in name
        assert dtype == (torch.bfloat16 if vision_linear or bert_linear else torch.float32), name
    # The text tower (train/bank/score prompts) is untouched.
    assert all(p.dtype == torch.float32 for p in bf16.text_encoder.parameters())


def test_bf16_layer_norms_see_fp32_inputs(backbones: tuple[Backbone, Backbone]) -> None:
    """LayerNorm statistics in fp32: every LayerNorm of the image encoders gets an fp32 input."""
    _, bf16 = backbones
    seen: list[tuple[str, torch.dtype]] = []
    hooks = [
        module.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, args[0].dtype)))
        for root in (bf16.clip.visual, bf16.qformer)
        for name, module in root.named_modules()
        if isinstance(module, nn.LayerNorm)
    ]
    try:
        with torch.inference_mode():
            bf16.encode_images(_images(1), share_trunk=False)
            bf16.encode_images(_images(1), share_trunk=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) > 20
    assert all(dtype == torch.float32 for _, dtype in seen), [name for name, dtype in seen if dtype != torch.float32]


def test_bf16_attention_accumulates_the_softmax_in_fp32() -> None:
    """The bf16 attention kernel sums the 257 softmax terms in fp32: on the same bf16 inputs its
    output is the fp64 result to within bf16 rounding (measured 2.2e-3 relative; rounding the
    exact output to bf16 alone gives 1.7e-3). Summing the denominator in bf16 (8-bit mantissa),
    which stalls once the running sum nears 1, gives 4.3e-2 on these inputs."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 257, 64, generator=generator).bfloat16() for _ in range(3))
    with torch.inference_mode():
        got = F.scaled_dot_product_attention(q, k, v).double()
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(64)
    expected = torch.softmax(scores, dim=-1) @ v.double()
    assert _relative_error(got, expected) <= 2**-8


def test_precision_change_is_one_way() -> None:
    backbone = build_random_backbone(get_spec("tiny")).set_precision("bf16")
    assert backbone.set_precision("bf16") is backbone
    with pytest.raises(ValueError, match="cannot change a bf16 backbone"):
        backbone.set_precision("fp32")


# --- fidelity on tiny against independent fp32 computations ---------------------------------------


def _images(batch: int, seed: int = 7) -> Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _independent_fp32_features(backbone: Backbone, images: Tensor) -> dict[str, Tensor]:
    """cls_token, qformer, vv, mem written out: open_clip's own blocks (its nn.MultiheadAttention path,
    not iipad's forward), the V-V residual of reference-implementation.md §1 and the Q-Former step by step."""
    spec, visual = backbone.spec, backbone.clip.visual
    blocks = list(visual.transformer.resblocks)
    states = [visual._embeds(images)]
    for block in blocks:
        states.append(block(states[-1]))
    x_vv = states[spec.vv_start_layer - 1]
    vv = {}
    for layer in range(spec.vv_start_layer, spec.vision_depth + 1):
        x_vv = x_vv + _vv_residual(blocks[layer - 1], states[layer - 1])
        vv[layer] = _layer_norm(x_vv[:, 1:], visual.ln_post) @ visual.proj
    cls_raw = states[-1][:, 0]
    state_dict = backbone.qformer.state_dict()
    return {
        "cls_token": torch.stack([cls_raw @ visual.proj, _layer_norm(cls_raw, visual.ln_post) @ visual.proj], dim=1),
        "qformer": torch.stack([_reference_qformer(image, state_dict, spec.qformer) for image in images]),
        "vv": torch.stack([vv[layer] for layer in spec.vv_layers], dim=1),
        "mem": torch.stack([states[layer][:, 1:] for layer in spec.memory_layers], dim=1),
    }


def _relative_error(got: Tensor, reference: Tensor) -> float:
    return ((got - reference).norm() / reference.norm()).item()


def _min_token_cosine(got: Tensor, reference: Tensor) -> float:
    return F.cosine_similarity(got.flatten(0, -2), reference.flatten(0, -2), dim=-1).min().item()


def test_bf16_features_within_the_documented_bound_of_fp32(backbones: tuple[Backbone, Backbone]) -> None:
    fp32, bf16 = backbones
    images = _images(3)
    with torch.no_grad():
        reference = _independent_fp32_features(fp32, images)
        got_fp32 = fp32.encode_images(images)
        got_bf16 = bf16.encode_images(images)
    for name, expected in reference.items():
        exact, approximate = getattr(got_fp32, name), getattr(got_bf16, name)
        assert approximate.dtype == torch.float32 and approximate.shape == expected.shape, name
        # The fp32 path is the reference's arithmetic; bf16 really rounds, within the bound.
        assert _relative_error(exact, expected) <= 1e-5, name
        assert 1e-6 < _relative_error(approximate, expected) <= TINY_BF16_MAX_RELATIVE_ERROR, name
        assert _min_token_cosine(approximate, expected) >= TINY_BF16_MIN_TOKEN_COSINE, name


def test_bf16_shared_trunk_equals_the_own_tower(backbones: tuple[Backbone, Backbone]) -> None:
    _, bf16 = backbones
    assert bf16.trunk_shared
    images = _images(2, seed=3)
    with torch.inference_mode():
        shared = bf16.encode_images(images, share_trunk=True).qformer
        separate = bf16.encode_images(images, share_trunk=False).qformer
    assert _relative_error(shared, separate) <= 1e-5
