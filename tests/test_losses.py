"""Each loss term of eqs. 6-12 (both presets) against a written-out computation with plain loops.

The references below work on Python floats, one image / layer / patch / token at a time, in the
order the released code and the paper describe (reference-implementation.md §4, paper §3.2).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from iipad_cli.config import get_preset
from iipad_cli.losses import (
    prompt_losses,
    semantic_loss_ce,
    semantic_loss_cosine,
    synthetic_anomalous_features,
    text_loss_ce,
    text_loss_cosine,
    token_alignment_weights,
    token_loss,
)

SPARSITY = 1.0 / 256.0


# ---- plain-Python references ------------------------------------------------------------------


def vec(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def unit(a: list[float]) -> list[float]:
    norm = math.sqrt(dot(a, a))
    return [x / norm for x in a]


def add(*vectors: list[float]) -> list[float]:
    return [sum(values) for values in zip(*vectors)]


def ref_synthetic(raw: torch.Tensor, noise: torch.Tensor, std: float, wrap_raw: bool) -> tuple[list, list]:
    """The released code's layer loop (in-place normalisation, Python's index -1) or the paper's
    normalise-everything-first variant, per image and patch."""
    normalised_all, synthetic_all = [], []
    for b in range(raw.shape[0]):
        layers = [[vec(raw[b, j, r]) for r in range(raw.shape[2])] for j in range(raw.shape[1])]
        if not wrap_raw:
            layers = [[unit(v) for v in layer] for layer in layers]
        synthetic = []
        for i in range(len(layers)):
            layers[i] = [unit(v) for v in layers[i]]  # in place, as the code does inside the loop
            prev = layers[i - 1]
            synthetic.append(
                [
                    unit(add(prev[r], layers[i][r], [std * x for x in vec(noise[b, i, r])]))
                    for r in range(len(layers[i]))
                ]
            )
        normalised_all.append(layers)
        synthetic_all.append(synthetic)
    return normalised_all, synthetic_all


def ref_semantic_cosine(feats, synth, e_n, e_a) -> float:
    total, count = 0.0, 0
    for b in range(len(feats)):
        for j in range(len(feats[b])):
            for r in range(len(feats[b][j])):
                f, s = feats[b][j][r], synth[b][j][r]
                total += ((1 - dot(f, e_n[b])) + (1 - dot(s, e_a[b])) + dot(f, e_a[b]) + dot(s, e_n[b])) / 4
                count += 1
    return total / count


def ref_semantic_ce(feats, synth, e_n, e_a) -> float:
    """Eq. 6 (with e^a in the second denominator term) + eq. 9."""
    normal, abnormal, count = 0.0, 0.0, 0
    for b in range(len(feats)):
        for j in range(len(feats[b])):
            for r in range(len(feats[b][j])):
                f, s = feats[b][j][r], synth[b][j][r]
                normal += -math.log(math.exp(dot(f, e_n[b])) / (math.exp(dot(f, e_n[b])) + math.exp(dot(f, e_a[b]))))
                abnormal += -math.log(math.exp(dot(s, e_a[b])) / (math.exp(dot(s, e_a[b])) + math.exp(dot(s, e_n[b]))))
                count += 1
    return normal / count + abnormal / count


def ref_weights(tokens: list[list[float]], patches: list[list[float]]) -> list[list[float]]:
    rows = []
    for p in tokens:
        sims = [dot(p, v) for v in patches]
        low, high = min(sims), max(sims)
        scaled = [1.0] * len(sims) if high == low else [(s - low) / (high - low) for s in sims]
        sparse = [x if x >= SPARSITY else 0.0 for x in scaled]
        rows.append([x / sum(sparse) for x in sparse])
    return rows


def ref_ce_pair(tokens: list[list[float]], patches: list[list[float]]) -> tuple[float, float]:
    weights = ref_weights(tokens, patches)
    groups = [unit(add(*[[w * x for x in v] for w, v in zip(row, patches)])) for row in weights]
    n = len(tokens)
    token_ce = group_ce = 0.0
    for t in range(n):
        token_ce += -math.log(math.exp(dot(tokens[t], groups[t])) / sum(math.exp(dot(tokens[t], groups[k])) for k in range(n)))
        group_ce += -math.log(math.exp(dot(groups[t], tokens[t])) / sum(math.exp(dot(groups[t], tokens[k])) for k in range(n)))
    return token_ce / n, group_ce / n


def ref_token_loss(feats, synth, p, n, reduction: str) -> float:
    terms = [0.0] * 4
    batch, layers = len(feats), len(feats[0])
    for b in range(batch):
        for j in range(layers):
            pair_n = ref_ce_pair(p[b], feats[b][j])
            pair_a = ref_ce_pair(n[b], synth[b][j])
            for k, value in enumerate((*pair_n, *pair_a)):
                terms[k] += value / (batch * layers)
    return sum(terms) / 4 if reduction == "mean" else sum(terms)


def ref_text_cosine(e_n, e_a, manual_n, manual_a) -> float:
    t_n = unit([sum(col) / len(manual_n) for col in zip(*manual_n)])
    t_a = unit([sum(col) / len(manual_a) for col in zip(*manual_a)])
    total = 0.0
    for b in range(len(e_n)):
        total += ((1 - dot(e_n[b], t_n)) + (1 - dot(e_a[b], t_a)) + dot(e_a[b], t_n) + dot(e_n[b], t_a)) / 4
    return total / len(e_n)


def ref_text_ce(e_n, e_a, manual_n, manual_a) -> float:
    """Eq. 11 with the expectations as means over the individual (normalised) manual prompts."""
    total = 0.0
    for b in range(len(e_n)):
        normal = sum(
            -math.log(math.exp(dot(e_n[b], unit(t))) / (math.exp(dot(e_n[b], unit(t))) + math.exp(dot(e_a[b], unit(t)))))
            for t in manual_n
        ) / len(manual_n)
        abnormal = sum(
            -math.log(math.exp(dot(e_a[b], unit(t))) / (math.exp(dot(e_a[b], unit(t))) + math.exp(dot(e_n[b], unit(t)))))
            for t in manual_a
        ) / len(manual_a)
        total += normal + abnormal
    return total / len(e_n)


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture()
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    B, L, P, D, T = 2, 3, 6, 5, 4

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def unit_rows(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True)

    return {
        "raw": randn(B, L, P, D) * 3.0,
        "noise": randn(B, L, P, D),
        "e_n": unit_rows(randn(B, D)),
        "e_a": unit_rows(randn(B, D)),
        "p": unit_rows(randn(B, T, D)),
        "n": unit_rows(randn(B, T, D)),
        "manual_n": randn(3, D) + 0.5,
        "manual_a": randn(5, D) - 0.5,
    }


def nested(t: torch.Tensor) -> list:
    return t.tolist()


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("std", "wrap_raw"), [(2.0, True), (1.0, False)])
def test_synthetic_features_match_the_layer_loop(inputs, std, wrap_raw):
    normalised, synthetic = synthetic_anomalous_features(
        inputs["raw"], inputs["noise"], noise_std=std, wrap_unnormalised_previous=wrap_raw
    )
    ref_norm, ref_synth = ref_synthetic(inputs["raw"], inputs["noise"], std, wrap_raw)
    assert torch.allclose(normalised, torch.tensor(ref_norm, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(synthetic, torch.tensor(ref_synth, dtype=torch.float64), atol=1e-12)


def test_official_first_layer_uses_the_raw_last_layer(inputs):
    """With zero noise and a huge raw last layer, F^a of the first layer points along that raw
    layer in `official` (it was not normalised yet), but not in `paper`."""
    raw = inputs["raw"].clone()
    raw[:, -1] *= 1e6
    zero = torch.zeros_like(raw)
    _, official = synthetic_anomalous_features(raw, zero, noise_std=2.0, wrap_unnormalised_previous=True)
    _, paper = synthetic_anomalous_features(raw, zero, noise_std=1.0, wrap_unnormalised_previous=False)
    last_dir = raw[:, -1] / raw[:, -1].norm(dim=-1, keepdim=True)
    assert torch.allclose(official[:, 0], last_dir, atol=1e-5)
    assert not torch.allclose(paper[:, 0], last_dir, atol=1e-2)


def test_official_presets_fields_select_the_code_variant():
    official, paper = get_preset("official"), get_preset("paper")
    assert (official.noise_std, official.wrap_unnormalised_previous) == (2.0, True)
    assert (paper.noise_std, paper.wrap_unnormalised_previous) == (1.0, False)


def _features(inputs, wrap_raw: bool, std: float):
    return ref_synthetic(inputs["raw"], inputs["noise"], std, wrap_raw)


def test_semantic_cosine_matches_loops(inputs):
    normalised, synthetic = synthetic_anomalous_features(inputs["raw"], inputs["noise"], noise_std=2.0, wrap_unnormalised_previous=True)
    feats, synth = _features(inputs, True, 2.0)
    expected = ref_semantic_cosine(feats, synth, nested(inputs["e_n"]), nested(inputs["e_a"]))
    got = semantic_loss_cosine(normalised, synthetic, inputs["e_n"], inputs["e_a"])
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_semantic_ce_matches_loops(inputs):
    normalised, synthetic = synthetic_anomalous_features(inputs["raw"], inputs["noise"], noise_std=1.0, wrap_unnormalised_previous=False)
    feats, synth = _features(inputs, False, 1.0)
    expected = ref_semantic_ce(feats, synth, nested(inputs["e_n"]), nested(inputs["e_a"]))
    got = semantic_loss_ce(normalised, synthetic, inputs["e_n"], inputs["e_a"])
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_semantic_ce_is_not_the_eq6_typo(inputs):
    """With e^n in both denominator terms (eq. 6 as printed) every patch would cost log 2."""
    normalised, synthetic = synthetic_anomalous_features(inputs["raw"], inputs["noise"], noise_std=1.0, wrap_unnormalised_previous=False)
    got = float(semantic_loss_ce(normalised, synthetic, inputs["e_n"], inputs["e_a"]))
    assert got != pytest.approx(2 * math.log(2.0), abs=1e-3)


def test_token_weights_match_loops(inputs):
    feats, _ = _features(inputs, True, 2.0)
    got = token_alignment_weights(inputs["p"], torch.tensor(feats, dtype=torch.float64)[:, 0], SPARSITY)
    for b in range(inputs["p"].shape[0]):
        expected = ref_weights(nested(inputs["p"][b]), feats[b][0])
        assert torch.allclose(got[b], torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(got.sum(dim=-1), torch.ones(got.shape[:2], dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_token_loss_matches_loops(inputs, reduction):
    normalised, synthetic = synthetic_anomalous_features(inputs["raw"], inputs["noise"], noise_std=2.0, wrap_unnormalised_previous=True)
    feats, synth = _features(inputs, True, 2.0)
    expected = ref_token_loss(feats, synth, nested(inputs["p"]), nested(inputs["n"]), reduction)
    got = token_loss(normalised, synthetic, inputs["p"], inputs["n"], sparsity=SPARSITY, reduction=reduction)
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_constant_row_gets_uniform_weights():
    """A token orthogonal to every patch has a constant similarity row: all patches weigh 1/P,
    and the loss stays finite (the released code would divide 0 by 0 here)."""
    patches = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.8, 0.0, 0.6]]], dtype=torch.float64)
    patches[..., 2] = 0.0
    patches = patches / patches.norm(dim=-1, keepdim=True)
    tokens = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]], dtype=torch.float64)
    weights = token_alignment_weights(tokens, patches, SPARSITY)
    assert torch.equal(weights[0, 0], torch.full((4,), 0.25, dtype=torch.float64))
    expected = ref_weights(nested(tokens[0]), nested(patches[0]))
    assert torch.allclose(weights[0], torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    loss = token_loss(patches[:, None], patches[:, None], tokens, tokens, sparsity=SPARSITY, reduction="mean")
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(
        sum(ref_ce_pair(nested(tokens[0]), nested(patches[0]))) / 2, abs=1e-12
    )


def test_single_surviving_patch_gives_one_hot_weights():
    """Similarities [1, 0, 0.001, 0.002, 0]: after min-max only the first is ≥ 1/256, so the token's
    group embedding is exactly that patch."""
    sims = [1.0, 0.0, 0.001, 0.002, 0.0]
    patches = torch.tensor([[s, math.sqrt(1 - s * s), 0.0] for s in sims], dtype=torch.float64)[None]
    tokens = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    weights = token_alignment_weights(tokens, patches, SPARSITY)
    assert torch.equal(weights[0, 0], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    loss = token_loss(patches[:, None], patches[:, None], tokens, tokens, sparsity=SPARSITY, reduction="sum")
    expected = 2 * sum(ref_ce_pair(nested(tokens[0]), nested(patches[0])))
    assert float(loss) == pytest.approx(expected, abs=1e-12)


def test_text_loss_cosine_matches_loops(inputs):
    expected = ref_text_cosine(nested(inputs["e_n"]), nested(inputs["e_a"]), nested(inputs["manual_n"]), nested(inputs["manual_a"]))
    got = text_loss_cosine(inputs["e_n"], inputs["e_a"], inputs["manual_n"], inputs["manual_a"])
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_text_loss_ce_matches_loops(inputs):
    expected = ref_text_ce(nested(inputs["e_n"]), nested(inputs["e_a"]), nested(inputs["manual_n"]), nested(inputs["manual_a"]))
    got = text_loss_ce(inputs["e_n"], inputs["e_a"], inputs["manual_n"], inputs["manual_a"])
    assert float(got) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("preset_name", ["official", "paper"])
def test_total_loss_per_preset(inputs, preset_name):
    """Eq. 12 as each preset defines it: official L_t + 0.125 L_s + L_f (all /4 means),
    paper (L_s^n + L_s^a) + 8 (L_f^n + L_f^a) + 8 L_t, each part from the loop references."""
    preset = get_preset(preset_name)
    terms = prompt_losses(
        features=inputs["raw"],
        noise=inputs["noise"],
        e_normal=inputs["e_n"],
        e_abnormal=inputs["e_a"],
        normal_tokens=inputs["p"],
        abnormal_tokens=inputs["n"],
        manual_normal=inputs["manual_n"],
        manual_abnormal=inputs["manual_a"],
        preset=preset,
    )
    e_n, e_a = nested(inputs["e_n"]), nested(inputs["e_a"])
    m_n, m_a = nested(inputs["manual_n"]), nested(inputs["manual_a"])
    if preset_name == "official":
        feats, synth = ref_synthetic(inputs["raw"], inputs["noise"], 2.0, True)
        semantic = ref_semantic_cosine(feats, synth, e_n, e_a)
        token = ref_token_loss(feats, synth, nested(inputs["p"]), nested(inputs["n"]), "mean")
        text = ref_text_cosine(e_n, e_a, m_n, m_a)
        total = text + 0.125 * semantic + token
    else:
        feats, synth = ref_synthetic(inputs["raw"], inputs["noise"], 1.0, False)
        semantic = ref_semantic_ce(feats, synth, e_n, e_a)
        token = ref_token_loss(feats, synth, nested(inputs["p"]), nested(inputs["n"]), "sum")
        text = ref_text_ce(e_n, e_a, m_n, m_a)
        total = semantic + 8 * token + 8 * text
    assert float(terms.semantic) == pytest.approx(semantic, abs=1e-12)
    assert float(terms.token) == pytest.approx(token, abs=1e-12)
    assert float(terms.text) == pytest.approx(text, abs=1e-12)
    assert float(terms.total) == pytest.approx(total, abs=1e-10)


def test_weights_come_from_preset_fields(inputs):
    """Changing only the weight fields rescales the parts; no branch on the preset's name."""
    preset = dataclasses.replace(get_preset("official"), name="custom", weight_semantic=2.0, weight_token=0.5, weight_text=3.0)
    terms = prompt_losses(
        features=inputs["raw"],
        noise=inputs["noise"],
        e_normal=inputs["e_n"],
        e_abnormal=inputs["e_a"],
        normal_tokens=inputs["p"],
        abnormal_tokens=inputs["n"],
        manual_normal=inputs["manual_n"],
        manual_abnormal=inputs["manual_a"],
        preset=preset,
    )
    assert float(terms.total) == pytest.approx(
        2.0 * float(terms.semantic) + 0.5 * float(terms.token) + 3.0 * float(terms.text), abs=1e-12
    )
