"""Category-aware retrieval, anomaly maps and image scores (paper §3.3–3.4, eqs. 13–18).

Pure torch on whatever device the inputs live on; no I/O. Every function is batched over test
images. Bank tensors are the ones `iipad bank` stores, already L2-normalised (per token / per
prompt / per patch); test tensors are raw features and are normalised here, exactly as the released
code does at test time (reference-implementation.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from iipad_cli.config import image_score

# Batch chunk of the visual k-NN: bounds the (chunk, P, k·P) similarity tensor and the gathered bank
# patches (chunk, k·P, W) to a few hundred MB at ViT-L/14 size.
VISUAL_CHUNK = 16


def normalise(x: Tensor) -> Tensor:
    """L2-normalise the last dimension (eps as F.normalize: a zero vector stays zero, no NaN)."""
    return F.normalize(x, dim=-1)


def retrieval_similarity(query: Tensor, bank_query: Tensor) -> Tensor:
    """Token-aligned mean cosine between Q-Former tokens (reference §5.2).

    query (B, M, d) raw test tokens, bank_query (N, M, d) normalised bank tokens -> (B, N):
    sim[b, n] = mean_t <ẑ_t(b), ẑ_t(n)>. Token t is compared with token t only (not set to set),
    which is one matmul over the flattened (M·d) vectors divided by M.
    """
    tokens = query.shape[1]
    flat = normalise(query).flatten(1)
    return flat @ bank_query.flatten(1).T / tokens


def retrieve(similarity: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most similar bank images per test image: (values (B, k), indices (B, k)), best first."""
    if not 1 <= k <= similarity.shape[1]:
        raise ValueError(f"top-k {k} outside 1..{similarity.shape[1]} (bank size)")
    values, indices = similarity.topk(k, dim=1)
    return values, indices


def fuse_prompts(test_prompts: Tensor, bank_prompts: Tensor, indices: Tensor) -> Tensor:
    """Eq. 15 plus the released code's final normalisation (reference §5.3).

    test_prompts (B, 2, D) normalised [e_t^n, e_t^a]; bank_prompts (N, 2, D) normalised; indices
    (B, k) -> (B, 2, D): ē = normalise(½(mean of the retrieved bank prompts + e_t)).
    """
    retrieved = bank_prompts[indices].mean(dim=1)
    return normalise(0.5 * (retrieved + test_prompts))


def prompt_map(vv: Tensor, fused: Tensor, temperature: float) -> Tensor:
    """Eq. 16 with a temperature, averaged over the V-V layers: Ā^p (B, P).

    vv (B, L, P, D) raw V-V patch tokens, fused (B, 2, D) [ē^n, ē^a]. Per layer and patch,
    softmax([<F̂, ē^n>, <F̂, ē^a>] / τ)[1]; τ = preset.temperature (the paper writes none, the
    released code uses 0.07 — reference §5.4).
    """
    logits = torch.einsum("blpd,bsd->blps", normalise(vv), fused) / temperature
    return logits.softmax(dim=-1)[..., 1].mean(dim=1)


def visual_map(mem: Tensor, bank_mem: Tensor, indices: Tensor, chunk: int = VISUAL_CHUNK) -> Tensor:
    """Eq. 17: A^v (B, P) against the retrieved images' memory tokens.

    mem (B, Lm, P, W) raw original-path tokens of the test images; bank_mem (Lm, N, P, W) normalised
    bank tokens; indices (B, k). For each memory layer, min over the k·P retrieved patches of
    (1 − cos)/2 = (1 − max cos)/2, summed over layers. Chunked over the batch so the similarity
    tensor stays bounded; each chunk is one batched matmul.
    """
    batch, layers, patches, _ = mem.shape
    out = mem.new_zeros(batch, patches)
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        idx = indices[start:stop]
        for layer in range(layers):
            test = normalise(mem[start:stop, layer])
            bank = bank_mem[layer][idx].flatten(1, 2)
            best = torch.bmm(test, bank.transpose(1, 2)).amax(dim=-1)
            out[start:stop] += 0.5 * (1.0 - best)
    return out


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """scipy.ndimage's Gaussian taps: radius int(truncate·σ + 0.5), normalised to sum 1 (float64)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 * (x / sigma) ** 2)
    return phi / phi.sum()


def _reflect_indices(length: int, radius: int, device: torch.device) -> Tensor:
    """Indices of scipy's 'reflect' (half-sample symmetric, d c b a | a b c d | d c b a) padding.

    Works for any radius, also one larger than the signal (the pattern repeats with period 2n).
    """
    index = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(index >= length, 2 * length - 1 - index, index)


def gaussian_smooth(maps: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian filter of (B, H, W) maps, equal to scipy.ndimage.gaussian_filter(mode='reflect').

    torch's own 'reflect' padding excludes the edge sample (scipy's 'mirror'), so the padding is an
    explicit index gather.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate).to(device=maps.device, dtype=maps.dtype)
    radius = (kernel.numel() - 1) // 2
    weight = kernel.view(1, 1, -1)
    batch, height, width = maps.shape
    rows = maps[..., _reflect_indices(width, radius, maps.device)]
    rows = F.conv1d(rows.reshape(batch * height, 1, -1), weight).view(batch, height, width)
    cols = rows.transpose(1, 2)[..., _reflect_indices(height, radius, maps.device)]
    cols = F.conv1d(cols.reshape(batch * width, 1, -1), weight).view(batch, width, height)
    return cols.transpose(1, 2).contiguous()


def upsample_and_smooth(grid_maps: Tensor, resolution: int, sigma: float, truncate: float = 4.0) -> Tensor:
    """(B, G, G) grid maps -> (B, R, R): bilinear (align_corners=False), then Gaussian (reference §5.6)."""
    up = F.interpolate(grid_maps.unsqueeze(1), size=(resolution, resolution), mode="bilinear", align_corners=False)
    return gaussian_smooth(up.squeeze(1), sigma, truncate)


def p_normal(cls_token: Tensor, bank_prompts: Tensor, indices: Tensor, temperature: float) -> Tensor:
    """The released code's global "normal" probability (reference §5.7): (B,).

    cls_token (B, D) raw E_v(x) of the preset's variant (normalised here); bank_prompts (N, 2, D);
    mean over the retrieved b of softmax([<c, e_b^n>, <c, e_b^a>] / τ)[0]. The *bank* prompts are
    used, not the fused ones, as in the code.
    """
    logits = torch.einsum("bd,bksd->bks", normalise(cls_token), bank_prompts[indices]) / temperature
    return logits.softmax(dim=-1)[..., 0].mean(dim=1)


@dataclass
class AnomalyOutput:
    """Everything `scores.h5` stores for a batch of test images.

    grid_prompt/grid_visual (B, G, G) are the un-smoothed maps Ā^p and A^v; maps (B, R, R) the final
    upsampled, smoothed pixel maps; the components let either image-score formula be re-evaluated.
    """

    maps: Tensor
    grid_prompt: Tensor
    grid_visual: Tensor
    image_score: Tensor
    prompt_max: Tensor
    visual_max: Tensor
    p_normal: Tensor
    retrieval_sim: Tensor
    retrieved: Tensor


def anomaly_scores(
    *,
    query: Tensor,
    cls_token: Tensor,
    vv: Tensor,
    mem: Tensor,
    test_prompts: Tensor,
    bank_query: Tensor,
    bank_prompts: Tensor,
    bank_mem: Tensor,
    top_k: int,
    temperature: float,
    formula: str,
    resolution: int,
    sigma: float,
    truncate: float = 4.0,
) -> AnomalyOutput:
    """Eqs. 15–18 and the image score for a batch, from features and the test images' own prompts.

    test_prompts (B, 2, D) are the normalised [e_t^n, e_t^a] of the test images (generator + text
    encoder); the other shapes are as in the functions above. The grid side G is √P.
    """
    values, indices = retrieve(retrieval_similarity(query, bank_query), top_k)
    fused = fuse_prompts(test_prompts, bank_prompts, indices)
    a_prompt = prompt_map(vv, fused, temperature)
    a_visual = visual_map(mem, bank_mem, indices)
    grid = int(round(a_prompt.shape[1] ** 0.5))
    if grid * grid != a_prompt.shape[1]:
        raise ValueError(f"{a_prompt.shape[1]} patches do not form a square grid")
    grid_prompt = a_prompt.view(-1, grid, grid)
    grid_visual = a_visual.view(-1, grid, grid)
    maps = upsample_and_smooth(grid_prompt + grid_visual, resolution, sigma, truncate)
    prompt_max = a_prompt.amax(dim=1)
    visual_max = a_visual.amax(dim=1)
    p_norm = p_normal(cls_token, bank_prompts, indices, temperature)
    retrieval_sim = values.mean(dim=1)
    return AnomalyOutput(
        maps=maps,
        grid_prompt=grid_prompt,
        grid_visual=grid_visual,
        image_score=image_score(prompt_max, visual_max, p_norm, retrieval_sim, formula),
        prompt_max=prompt_max,
        visual_max=visual_max,
        p_normal=p_norm,
        retrieval_sim=retrieval_sim,
        retrieved=indices,
    )


def instance_prompts(generator: torch.nn.Module, text_encoder: torch.nn.Module, query: Tensor, cls_token: Tensor) -> Tensor:
    """The normalised [e^n, e^a] (B, 2, D) of images from their own features (eqs. 2–5).

    query (B, M, d) raw Q-Former tokens and cls_token (B, D) the raw E_v(x) of the preset's variant,
    normalised here as in training. The caller puts the generator in eval mode (no dropout) and
    disables autograd.

    One image at a time (its two states share one text-encoder batch of 2): CPU and GPU matrix
    kernels round a row differently depending on the batch shape and the row's position in it, so
    a batched pass would make an image's prompts — and its map — depend on which images share its
    batch. Per image, `score` and `predict` give bit-identical results for the same image.
    """
    rows = []
    for index in range(query.shape[0]):
        s_normal, s_abnormal = generator(query[index : index + 1], normalise(cls_token[index : index + 1]))
        embeddings, _ = text_encoder(torch.cat([s_normal, s_abnormal]))
        rows.append(normalise(embeddings))
    return torch.stack(rows)
