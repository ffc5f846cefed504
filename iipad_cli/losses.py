"""Multi-modal prompt losses (paper eqs. 6-12, reference §4), batched over B images.

Shapes: features F (B, L, P, D) are the V-V patch tokens of L layers (CLS dropped); e^n, e^a (B, D)
are the prompt embeddings; p, n (B, T', D) the per-token text states. Every function expects its
inputs L2-normalised (so dot products are cosines) unless it says otherwise, and returns the mean
over the batch, which for B = 1 is exactly the released code's per-image loss.

Which form is used is decided by `Preset` fields only (semantic_loss, text_loss, noise_std,
wrap_unnormalised_previous, token_sparsity, token_loss_reduction, weight_*), never by preset name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from iipad_cli.config import Preset
from iipad_cli.models.anomaly import normalise


def synthetic_anomalous_features(
    features: Tensor, noise: Tensor, *, noise_std: float, wrap_unnormalised_previous: bool
) -> tuple[Tensor, Tensor]:
    """Eq. 8: F^a_j = Normalize(F_j + F_j' + ε), j' the layer before j, wrapping to the last layer.

    `features` are the raw (un-normalised) tokens (B, L, P, D); `noise` is standard normal of the
    same shape and is scaled by `noise_std` (2 in the released code, 1 in the paper). Returns
    (normalised F, F^a).

    With `wrap_unnormalised_previous` (released code) the first layer's previous layer is the
    *raw* last layer: the code normalises the list in place inside the layer loop, so when layer 0
    reads index -1 the last layer has not been normalised yet. Without it (paper preset) every
    layer is normalised first and the first layer still wraps to the (normalised) last one, since
    eq. 8 leaves j' undefined for the first layer and wrapping keeps all L layers in the loss.
    """
    if features.shape != noise.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from features {tuple(features.shape)}")
    normalised = normalise(features)
    previous = torch.roll(normalised, shifts=1, dims=1)
    if wrap_unnormalised_previous:
        previous = torch.cat([features[:, -1:], previous[:, 1:]], dim=1)
    synthetic = normalise(normalised + previous + noise_std * noise)
    return normalised, synthetic


def semantic_loss_cosine(features: Tensor, synthetic: Tensor, e_normal: Tensor, e_abnormal: Tensor) -> Tensor:
    """Released code's L_s: mean over layers and patches of
    [(1 - <F, e^n>) + (1 - <F^a, e^a>) + <F, e^a> + <F^a, e^n>] / 4."""
    f_n = torch.einsum("blpd,bd->blp", features, e_normal)
    f_a = torch.einsum("blpd,bd->blp", features, e_abnormal)
    s_n = torch.einsum("blpd,bd->blp", synthetic, e_normal)
    s_a = torch.einsum("blpd,bd->blp", synthetic, e_abnormal)
    return ((1 - f_n) + (1 - s_a) + f_a + s_n).mean() / 4


def semantic_loss_ce(features: Tensor, synthetic: Tensor, e_normal: Tensor, e_abnormal: Tensor) -> Tensor:
    """Paper's L_s^n + L_s^a (eqs. 6, 9): per patch, a two-way softmax over the cosines with
    (e^n, e^a), no temperature; the normal patch's target is e^n, the synthetic patch's is e^a.

    Eq. 6 prints e^n in both denominator terms; the second must be e^a (otherwise the loss is the
    constant log 2), as eq. 9 confirms.
    """
    prompts = torch.stack([e_normal, e_abnormal], dim=1)  # (B, 2, D)
    normal_logits = torch.einsum("blpd,bkd->blpk", features, prompts)
    synthetic_logits = torch.einsum("blpd,bkd->blpk", synthetic, prompts)
    loss_normal = -F.log_softmax(normal_logits, dim=-1)[..., 0].mean()
    loss_abnormal = -F.log_softmax(synthetic_logits, dim=-1)[..., 1].mean()
    return loss_normal + loss_abnormal


def token_alignment_weights(tokens: Tensor, patches: Tensor, sparsity: float) -> Tensor:
    """W (B, T', P) of eqs. 7/10 as the released code computes it.

    M = <p_t, v_r>; min-max normalise each token's row over patches; zero entries below
    `sparsity`; divide each row by its own sum (the paper divides by the sum of the raw M, which
    can be zero or negative for cosines, so the code's choice is used in both presets).

    A constant row (max == min, e.g. a token orthogonal to every patch) has no min-max range: it
    is defined as all ones, i.e. every patch equally relevant, giving uniform weights 1/P. Any
    other row keeps its maximum (value 1 ≥ sparsity), so its sum is ≥ 1 and a row where only one
    patch survives becomes a one-hot weight.
    """
    similarity = torch.einsum("btd,bpd->btp", tokens, patches)
    low = similarity.amin(dim=-1, keepdim=True)
    high = similarity.amax(dim=-1, keepdim=True)
    spread = high - low
    flat = spread <= 0
    scaled = torch.where(flat, torch.ones_like(similarity), (similarity - low) / torch.where(flat, 1.0, spread))
    sparse = torch.where(scaled < sparsity, torch.zeros_like(scaled), scaled)
    return sparse / sparse.sum(dim=-1, keepdim=True)


def token_alignment_pair(tokens: Tensor, patches: Tensor, sparsity: float) -> tuple[Tensor, Tensor]:
    """The two cross-entropy directions of eq. 7 (or 10) for one layer, each (B,) mean over T'.

    ṽ_t = Normalize(Σ_r W_tr v_r). "token→groups": row t of <p_t, ṽ_k> over k, target t;
    "group→tokens": row t of <ṽ_t, p_k> over k, target t. Raw cosines, no temperature.
    """
    weights = token_alignment_weights(tokens, patches, sparsity)
    groups = normalise(torch.einsum("btp,bpd->btd", weights, patches))
    token_logits = torch.einsum("btd,bkd->btk", tokens, groups)
    group_logits = torch.einsum("btd,bkd->btk", groups, tokens)
    target = torch.arange(tokens.shape[1], device=tokens.device)
    token_ce = -F.log_softmax(token_logits, dim=-1)[:, target, target].mean(dim=-1)
    group_ce = -F.log_softmax(group_logits, dim=-1)[:, target, target].mean(dim=-1)
    return token_ce, group_ce


def token_loss(
    features: Tensor,
    synthetic: Tensor,
    normal_tokens: Tensor,
    abnormal_tokens: Tensor,
    *,
    sparsity: float,
    reduction: str,
) -> Tensor:
    """L_f from the four CE terms (normal/abnormal × two directions), each averaged over layers
    and images: "mean" = their mean (released code), "sum" = L_f^n + L_f^a of eqs. 7 + 10."""
    terms = torch.zeros(4, dtype=features.dtype, device=features.device)
    layers = features.shape[1]
    for layer in range(layers):
        normal_pair = token_alignment_pair(normal_tokens, features[:, layer], sparsity)
        abnormal_pair = token_alignment_pair(abnormal_tokens, synthetic[:, layer], sparsity)
        terms = terms + torch.stack([term.mean() for term in (*normal_pair, *abnormal_pair)])
    terms = terms / layers
    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        return terms.sum()
    raise ValueError(f"unknown token loss reduction {reduction!r}")


def text_loss_cosine(e_normal: Tensor, e_abnormal: Tensor, manual_normal: Tensor, manual_abnormal: Tensor) -> Tensor:
    """Released code's L_t against the ensemble means t^n, t^a:
    [(1 - <e^n, t^n>) + (1 - <e^a, t^a>) + <e^a, t^n> + <e^n, t^a>] / 4.

    `manual_*` are the raw (un-normalised) manual prompt embeddings (N, D); their mean is
    normalised, as the released code averages before normalising.
    """
    t_n = normalise(manual_normal.mean(dim=0))
    t_a = normalise(manual_abnormal.mean(dim=0))
    terms = (1 - e_normal @ t_n) + (1 - e_abnormal @ t_a) + e_abnormal @ t_n + e_normal @ t_a
    return terms.mean() / 4


def text_loss_ce(e_normal: Tensor, e_abnormal: Tensor, manual_normal: Tensor, manual_abnormal: Tensor) -> Tensor:
    """Eq. 11: for each individual normalised manual prompt t, a two-way softmax over
    (<e^n, t>, <e^a, t>) with the matching state as target, averaged over the prompts of each set
    (the expectations), summed over the two sets."""
    t_n = normalise(manual_normal)
    t_a = normalise(manual_abnormal)
    normal_logits = torch.stack([e_normal @ t_n.T, e_abnormal @ t_n.T], dim=-1)  # (B, Nn, 2)
    abnormal_logits = torch.stack([e_abnormal @ t_a.T, e_normal @ t_a.T], dim=-1)
    return -F.log_softmax(normal_logits, dim=-1)[..., 0].mean() - F.log_softmax(abnormal_logits, dim=-1)[..., 0].mean()


@dataclass(frozen=True)
class LossTerms:
    """The weighted total (eq. 12) and its unweighted parts."""

    total: Tensor
    semantic: Tensor
    token: Tensor
    text: Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in ("total", "semantic", "token", "text")}


def prompt_losses(
    *,
    features: Tensor,
    noise: Tensor,
    e_normal: Tensor,
    e_abnormal: Tensor,
    normal_tokens: Tensor,
    abnormal_tokens: Tensor,
    manual_normal: Tensor,
    manual_abnormal: Tensor,
    preset: Preset,
) -> LossTerms:
    """All losses of one step for a batch, per the preset.

    `features` are the raw V-V tokens (B, L, P, D); prompt embeddings and token states must be
    L2-normalised; `manual_*` are raw manual prompt embeddings; `noise` is standard normal, shaped
    like `features`. Total = w_s·L_s + w_f·L_f + w_t·L_t (official: 0.125, 1, 1; paper: 1, 8, 8).
    """
    normalised, synthetic = synthetic_anomalous_features(
        features, noise, noise_std=preset.noise_std, wrap_unnormalised_previous=preset.wrap_unnormalised_previous
    )
    semantic_fn = semantic_loss_cosine if preset.semantic_loss == "cosine" else semantic_loss_ce
    text_fn = text_loss_cosine if preset.text_loss == "cosine" else text_loss_ce
    semantic = semantic_fn(normalised, synthetic, e_normal, e_abnormal)
    token = token_loss(
        normalised,
        synthetic,
        normal_tokens,
        abnormal_tokens,
        sparsity=preset.token_sparsity,
        reduction=preset.token_loss_reduction,
    )
    text = text_fn(e_normal, e_abnormal, manual_normal, manual_abnormal)
    total = preset.weight_semantic * semantic + preset.weight_token * token + preset.weight_text * text
    return LossTerms(total=total, semantic=semantic, token=token, text=text)
