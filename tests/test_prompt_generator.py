"""The prompt generator (eqs. 2-4, reference §3): shapes, parameter count, a written-out forward,
initialisation, dropout only in training mode, and batched == per image."""

from __future__ import annotations

import math

import pytest
import torch

from iipad_cli.config import get_preset
from iipad_cli.models.prompt_generator import GeneratorConfig, PromptGenerator


def linear_params(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def test_official_parameter_count_equals_released_code():
    """Sum of the released SoftPrompt's layer shapes (reference §3), d=768, T=24, m=4, M=16:
    ≈ 8.90 M."""
    d, T, M = 768, 24, 16
    prefixes = 2 * T * d
    f_p = linear_params(d, d) + linear_params(1, T)
    g = linear_params(1, 16) + linear_params(d, d) + linear_params(16, T)
    z_proj = linear_params(d, d) + linear_params(M, 16)
    attention = 3 * d * d + 3 * d + linear_params(d, d)  # in_proj (q, k, v) + out_proj
    f = linear_params(1, 16) + linear_params(d, d) + linear_params(16, T)
    objects = linear_params(M, 8) + linear_params(8, 4)
    expected = prefixes + f_p + 2 * (g + z_proj + attention + f + objects)
    config = GeneratorConfig.from_preset(get_preset("official"), width=d, query_tokens=M)
    count = sum(p.numel() for p in PromptGenerator(config).parameters())
    assert count == expected
    assert round(count / 1e6, 2) == 8.90


def test_paper_structure_has_no_extra_cls_branch():
    d, T = 64, 24
    official = PromptGenerator(GeneratorConfig.from_preset(get_preset("official"), width=d, query_tokens=16))
    paper = PromptGenerator(GeneratorConfig.from_preset(get_preset("paper"), width=d, query_tokens=16))
    g = linear_params(1, 16) + linear_params(d, d) + linear_params(16, T)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(official) - count(paper) == 2 * g


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_output_shapes(preset):
    config = GeneratorConfig.from_preset(get_preset(preset), width=32, query_tokens=16)
    generator = PromptGenerator(config)
    s_n, s_a = generator(torch.randn(3, 16, 32), torch.randn(3, 32))
    assert s_n.shape == s_a.shape == (3, 24 + 4, 32)


def _lin(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def _mix(mix, x: torch.Tensor) -> torch.Tensor:
    """Token mixing written out: out[t, ch] = Σ_s W[t, s] x[s, ch] + b[t]."""
    return mix.linear.weight @ x + mix.linear.bias[:, None]


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.01 * x)


def _reference_state(branch, shared_fp, z: torch.Tensor, c: torch.Tensor, object_activation: bool, extra: bool):
    """C and O of one state for one image (z (M, d), c (d,)), eval mode, from the weights."""
    d = c.shape[0]
    # Z' = TokenMix(LReLU(Linear(Z)))
    zp = _mix(branch.project[3], _lrelu(_lin(branch.project[0], z)))
    # 1-head attention, query c, key = value = Z'
    attn = branch.attention
    wq, wk, wv = attn.in_proj_weight.split(d)
    bq, bk, bv = attn.in_proj_bias.split(d)
    q, k, v = wq @ c + bq, zp @ wk.T + bk, zp @ wv.T + bv
    scores = torch.softmax(k @ q / math.sqrt(d), dim=0)
    attended = _lin(attn.out_proj, scores @ v)

    def cls_to_prompt(module, vector, final_activation):
        x = _lrelu(_mix(module.expand[0], vector[None]))
        x = _lrelu(_lin(module.channel[0], x))
        x = _mix(module.out[0], x)
        return _lrelu(x) if final_activation else x

    context = shared_fp + cls_to_prompt(branch.attended, attended, False)
    if extra:
        context = context + cls_to_prompt(branch.cls_branch, c, True)
    hidden = _mix(branch.objects[0], z)
    if object_activation:
        hidden = _lrelu(hidden)
    objects = _lrelu(_mix(branch.objects[-2], hidden))
    return context, objects


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_forward_matches_written_out_equations(preset):
    """Eqs. 3-4 per image from the module's own weights: S = [P + f_p(c) + g(c) + f(CA(c, Z', Z')) ; O(Z)]."""
    torch.manual_seed(0)
    cfg = get_preset(preset)
    config = GeneratorConfig(
        width=8,
        prompt_tokens=5,
        object_tokens=2,
        query_tokens=6,
        mix_tokens=4,
        object_hidden=3,
        extra_cls_branch=cfg.extra_cls_branch,
        abnormal_object_activation=cfg.abnormal_object_activation,
    )
    generator = PromptGenerator(config).eval().double()
    z, c = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    s_n, s_a = generator(z, c)
    for b in range(2):
        shared = generator.shared
        fp = _mix(shared.tokens, _lrelu(_lin(shared.channel[0], c[b]))[None])
        ctx_n, obj_n = _reference_state(generator.normal, fp, z[b], c[b], True, cfg.extra_cls_branch)
        ctx_a, obj_a = _reference_state(
            generator.abnormal, fp, z[b], c[b], cfg.abnormal_object_activation, cfg.extra_cls_branch
        )
        expected_n = torch.cat([generator.normal_prefix[0] + ctx_n, obj_n])
        expected_a = torch.cat([generator.abnormal_prefix[0] + ctx_a, obj_a])
        assert torch.allclose(s_n[b], expected_n, atol=1e-10)
        assert torch.allclose(s_a[b], expected_a, atol=1e-10)


def test_abnormal_object_branch_activation_differs_between_presets():
    """Official O^a lacks the first LeakyReLU (the forward test checks its effect on values)."""
    official = PromptGenerator(GeneratorConfig.from_preset(get_preset("official"), width=16, query_tokens=16))
    paper = PromptGenerator(GeneratorConfig.from_preset(get_preset("paper"), width=16, query_tokens=16))
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in official.abnormal.objects) == 1
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in official.normal.objects) == 2
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in paper.abnormal.objects) == 2


@torch.no_grad()
def test_initialisation():
    torch.manual_seed(0)
    generator = PromptGenerator(GeneratorConfig(width=768))
    prefix = torch.cat([generator.normal_prefix.flatten(), generator.abnormal_prefix.flatten()])
    assert abs(float(prefix.std()) - 1.0) < 0.02
    weight = generator.shared.channel[0].weight
    assert abs(float(weight.std()) - math.sqrt(2.0 / 768)) < 0.002
    out_proj = generator.normal.attention.out_proj.weight
    assert abs(float(out_proj.std()) - math.sqrt(2.0 / 768)) < 0.002
    for module in generator.modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.count_nonzero(module.bias) == 0
    in_proj = generator.normal.attention.in_proj_weight  # xavier-uniform: bound sqrt(6 / (d + 3d))
    bound = math.sqrt(6.0 / (768 + 3 * 768))
    assert float(in_proj.abs().max()) <= bound
    assert float(in_proj.abs().max()) > 0.95 * bound
    assert torch.count_nonzero(generator.normal.attention.in_proj_bias) == 0


def test_dropout_only_in_training_mode():
    generator = PromptGenerator(GeneratorConfig(width=32))
    z, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    generator.train()
    a, b = generator(z, c)[0], generator(z, c)[0]
    assert not torch.equal(a, b)
    generator.eval()
    a, b = generator(z, c)[0], generator(z, c)[0]
    assert torch.equal(a, b)
    no_dropout = PromptGenerator(GeneratorConfig(width=32, dropout=False)).train()
    assert torch.equal(no_dropout(z, c)[0], no_dropout(z, c)[0])


def test_batched_equals_per_image():
    generator = PromptGenerator(GeneratorConfig(width=32)).eval()
    z, c = torch.randn(4, 16, 32), torch.randn(4, 32)
    s_n, s_a = generator(z, c)
    for i in range(4):
        one_n, one_a = generator(z[i : i + 1], c[i : i + 1])
        assert torch.allclose(s_n[i], one_n[0], atol=1e-5)
        assert torch.allclose(s_a[i], one_a[0], atol=1e-5)


def test_rejects_mismatched_inputs():
    generator = PromptGenerator(GeneratorConfig(width=32))
    with pytest.raises(ValueError):
        generator(torch.randn(2, 16, 32), torch.randn(3, 32))
