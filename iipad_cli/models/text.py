"""CLIP text encoder fed with prompt *embeddings* instead of token ids.

The prompt generator produces T' vectors in the text encoder's token-embedding space. The sequence
is [SOT] + T' vectors + [EOT] (+ padding in the released code, which always runs 77 positions).
Because the text transformer is causal, positions after EOT cannot influence positions ≤ T'+1, so
running only T'+2 positions gives the same EOT state and per-token states, exactly and cheaper.
"""

from __future__ import annotations

from typing import Literal

import torch
from open_clip.model import CLIP
from torch import Tensor, nn

# OpenAI CLIP BPE: start/end of text and the padding id (0, the BPE token "!").
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
PAD_TOKEN_ID = 0


class PromptTextEncoder(nn.Module):
    """Frozen CLIP text tower that encodes (B, T', d) prompt embeddings.

    Returns e = ln_final(EOT state) · text_projection (B, embed_dim) and the per-token states
    ln_final(positions 1..T') (B, T', width), unprojected as in the released code.
    """

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    def forward(self, prompts: Tensor, context: Literal["truncated", "full"] = "truncated") -> tuple[Tensor, Tensor]:
        batch, length, _ = prompts.shape
        used = length + 2
        if used > self.context_length:
            raise ValueError(f"{length} prompt vectors do not fit a {self.context_length}-token context")
        weight = self.token_embedding.weight
        sot = weight[SOT_TOKEN_ID].expand(batch, 1, -1)
        eot = weight[EOT_TOKEN_ID].expand(batch, 1, -1)
        parts = [sot, prompts.to(weight.dtype), eot]
        if context == "full":
            parts.append(weight[PAD_TOKEN_ID].expand(batch, self.context_length - used, -1))
        x = torch.cat(parts, dim=1)
        positions = x.shape[1]
        x = x + self.positional_embedding[:positions]
        x = self.transformer(x, attn_mask=self.attn_mask[:positions, :positions])
        x = self.ln_final(x)
        embedding = x[:, length + 1] @ self.text_projection
        return embedding, x[:, 1 : length + 1]
