"""Eqs. 15–18, retrieval and the official image score against written-out loop computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from iipad_cli.models import anomaly

TAU = 0.07


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(float((v * v).sum()))


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


@pytest.fixture()
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _case(rng: torch.Generator, batch: int = 3, bank: int = 5, tokens: int = 4, dim: int = 6, layers: int = 3,
          patches: int = 9, width: int = 7, mem_layers: int = 2) -> dict[str, torch.Tensor]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=rng, dtype=torch.float64)

    return {
        "query": randn(batch, tokens, dim),
        "cls": randn(batch, dim),
        "vv": randn(batch, layers, patches, dim),
        "mem": randn(batch, mem_layers, patches, width),
        "test_prompts": F.normalize(randn(batch, 2, dim), dim=-1),
        "bank_query": F.normalize(randn(bank, tokens, dim), dim=-1),
        "bank_prompts": F.normalize(randn(bank, 2, dim), dim=-1),
        "bank_mem": F.normalize(randn(mem_layers, bank, patches, width), dim=-1),
    }


def test_retrieval_is_token_aligned_mean_cosine(rng: torch.Generator) -> None:
    c = _case(rng)
    sim = anomaly.retrieval_similarity(c["query"], c["bank_query"])
    batch, tokens, _ = c["query"].shape
    for b in range(batch):
        for n in range(c["bank_query"].shape[0]):
            expected = sum(_dot(_unit(c["query"][b, t]), c["bank_query"][n, t]) for t in range(tokens)) / tokens
            assert float(sim[b, n]) == pytest.approx(expected, abs=1e-12)
    values, indices = anomaly.retrieve(sim, 2)
    for b in range(batch):
        order = sorted(range(sim.shape[1]), key=lambda n: -float(sim[b, n]))[:2]
        assert indices[b].tolist() == order
        assert values[b].tolist() == [float(sim[b, n]) for n in order]


def test_eq15_fused_prompts(rng: torch.Generator) -> None:
    c = _case(rng)
    indices = torch.tensor([[0, 3], [4, 1], [2, 2]])
    fused = anomaly.fuse_prompts(c["test_prompts"], c["bank_prompts"], indices)
    for b in range(3):
        for s in range(2):
            mean = sum(c["bank_prompts"][int(n), s] for n in indices[b]) / indices.shape[1]
            expected = _unit(0.5 * (mean + c["test_prompts"][b, s]))
            assert torch.allclose(fused[b, s], expected, atol=1e-12)


def test_eq16_prompt_map_with_temperature(rng: torch.Generator) -> None:
    c = _case(rng)
    fused = F.normalize(torch.randn(3, 2, 6, generator=rng, dtype=torch.float64), dim=-1)
    result = anomaly.prompt_map(c["vv"], fused, TAU)
    batch, layers, patches, _ = c["vv"].shape
    for b in range(batch):
        for p in range(patches):
            total = 0.0
            for j in range(layers):
                f = _unit(c["vv"][b, j, p])
                ea = math.exp(_dot(f, fused[b, 1]) / TAU)
                en = math.exp(_dot(f, fused[b, 0]) / TAU)
                total += ea / (ea + en)
            assert float(result[b, p]) == pytest.approx(total / layers, abs=1e-12)


def test_eq17_visual_map_min_over_retrieved_patches(rng: torch.Generator) -> None:
    c = _case(rng)
    indices = torch.tensor([[1, 4], [0, 2], [3, 3]])
    result = anomaly.visual_map(c["mem"], c["bank_mem"], indices, chunk=2)
    batch, mem_layers, patches, _ = c["mem"].shape
    for b in range(batch):
        for p in range(patches):
            total = 0.0
            for layer in range(mem_layers):
                f = _unit(c["mem"][b, layer, p])
                total += min(
                    0.5 * (1.0 - _dot(f, c["bank_mem"][layer, int(n), q]))
                    for n in indices[b]
                    for q in range(patches)
                )
            assert float(result[b, p]) == pytest.approx(total, abs=1e-12)


def test_gaussian_kernel_matches_scipy_radius_and_taps() -> None:
    kernel = anomaly.gaussian_kernel1d(4.0, 4.0)
    assert kernel.numel() == 2 * 16 + 1
    impulse = np.zeros(65)
    impulse[32] = 1.0
    expected = scipy.ndimage.gaussian_filter1d(impulse, sigma=4.0, mode="reflect", truncate=4.0)[16:49]
    assert np.allclose(kernel.numpy(), expected, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upsample_and_smooth_equals_scipy_gaussian(rng: torch.Generator, dtype: torch.dtype) -> None:
    grid = torch.rand(2, 16, 16, generator=rng, dtype=torch.float64) * 2.0
    result = anomaly.upsample_and_smooth(grid.to(dtype), 224, sigma=4.0, truncate=4.0)
    up = F.interpolate(grid.unsqueeze(1), size=(224, 224), mode="bilinear", align_corners=False).squeeze(1)
    for b in range(2):
        expected = scipy.ndimage.gaussian_filter(up[b].numpy(), sigma=4, mode="reflect", truncate=4)
        assert np.abs(result[b].double().numpy() - expected).max() < 1e-5


def test_smoothing_reflect_padding_when_radius_exceeds_the_signal(rng: torch.Generator) -> None:
    """scipy's 'reflect' repeats with period 2n; a 5x7 map with radius 16 exercises that."""
    maps = torch.rand(1, 5, 7, generator=rng, dtype=torch.float64)
    result = anomaly.gaussian_smooth(maps, sigma=4.0, truncate=4.0)
    expected = scipy.ndimage.gaussian_filter(maps[0].numpy(), sigma=4, mode="reflect", truncate=4)
    assert np.abs(result[0].numpy() - expected).max() < 1e-12


def test_p_normal_uses_bank_prompts_of_the_retrieved(rng: torch.Generator) -> None:
    c = _case(rng)
    indices = torch.tensor([[0, 1], [2, 3], [4, 0]])
    p_norm = anomaly.p_normal(c["cls"], c["bank_prompts"], indices, TAU)
    for b in range(3):
        cls = _unit(c["cls"][b])
        probs = []
        for n in indices[b]:
            en = math.exp(_dot(cls, c["bank_prompts"][int(n), 0]) / TAU)
            ea = math.exp(_dot(cls, c["bank_prompts"][int(n), 1]) / TAU)
            probs.append(en / (en + ea))
        assert float(p_norm[b]) == pytest.approx(sum(probs) / len(probs), abs=1e-12)


def test_anomaly_scores_end_to_end_eq18_and_official(rng: torch.Generator) -> None:
    """The whole batch pipeline vs a per-image written-out computation of eqs. 15–18 and §5.7."""
    c = _case(rng, batch=2, bank=4, patches=16)
    k = 2
    outputs = {
        formula: anomaly.anomaly_scores(
            query=c["query"], cls_token=c["cls"], vv=c["vv"], mem=c["mem"], test_prompts=c["test_prompts"],
            bank_query=c["bank_query"], bank_prompts=c["bank_prompts"], bank_mem=c["bank_mem"], top_k=k,
            temperature=TAU, formula=formula, resolution=12, sigma=1.0,
        )
        for formula in ("paper", "official")
    }
    tokens = c["query"].shape[1]
    for b in range(2):
        sims = [
            sum(_dot(_unit(c["query"][b, t]), c["bank_query"][n, t]) for t in range(tokens)) / tokens
            for n in range(4)
        ]
        top = sorted(range(4), key=lambda n: -sims[n])[:k]
        fused = [
            _unit(0.5 * (sum(c["bank_prompts"][n, s] for n in top) / k + c["test_prompts"][b, s])) for s in range(2)
        ]
        a_p, a_v = [], []
        for p in range(16):
            layer_probs = []
            for j in range(c["vv"].shape[1]):
                f = _unit(c["vv"][b, j, p])
                ea, en = math.exp(_dot(f, fused[1]) / TAU), math.exp(_dot(f, fused[0]) / TAU)
                layer_probs.append(ea / (ea + en))
            a_p.append(sum(layer_probs) / len(layer_probs))
            a_v.append(sum(
                min(0.5 * (1 - _dot(_unit(c["mem"][b, m, p]), c["bank_mem"][m, n, q])) for n in top for q in range(16))
                for m in range(2)
            ))
        cls = _unit(c["cls"][b])
        p_norm = sum(
            1.0 / (1.0 + math.exp((_dot(cls, c["bank_prompts"][n, 1]) - _dot(cls, c["bank_prompts"][n, 0])) / TAU))
            for n in top
        ) / k
        paper = max(a_p) + max(a_v)
        official = paper - p_norm - sum(sims[n] for n in top) / k
        for formula, expected in (("paper", paper), ("official", official)):
            out = outputs[formula]
            assert out.retrieved[b].tolist() == top
            assert float(out.image_score[b]) == pytest.approx(expected, abs=1e-10)
            assert float(out.p_normal[b]) == pytest.approx(p_norm, abs=1e-12)
            grid = torch.tensor([a + v for a, v in zip(a_p, a_v)], dtype=torch.float64).view(1, 1, 4, 4)
            up = F.interpolate(grid, size=(12, 12), mode="bilinear", align_corners=False)[0, 0].numpy()
            smooth = scipy.ndimage.gaussian_filter(up, sigma=1.0, mode="reflect", truncate=4)
            assert np.abs(out.maps[b].numpy() - smooth).max() < 1e-10
