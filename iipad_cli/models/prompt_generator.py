"""The class-shared, instance-specific prompt generator (paper eqs. 2-4, reference §3).

One network serves every class: it reads an image's CLIP class token c (B, d) and its Q-Former
object tokens Z (B, M, d) and writes a normal prompt S^n and an abnormal prompt S^a, each
(B, T + m, d) vectors in the text encoder's token-embedding space:

    S^n = [P + C^n ; O^n],   C^n = f_p(c) + g_n(c) + f_n(CA(c, Z^n, Z^n)),   O^n = h_n(Z)

and symmetrically for the abnormal state with N, g_a, f_a, Z^a, h_a. `official` reproduces the
released code's layers (token-mixing Linears, the extra CLS branch g, the abnormal object branch's
missing first activation); `paper` drops g (eq. 4 has no such term) and keeps the activation.
The released code is batch-1 only; here every layer works on a batch of images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from iipad_cli.config import Preset

LEAKY_SLOPE = 0.01
# Dropout rates of the released code: 0.2 after channel Linears, 0.1 after g's last token mixing.
CHANNEL_DROPOUT = 0.2
TOKEN_DROPOUT = 0.1


@dataclass(frozen=True)
class GeneratorConfig:
    """Sizes and structural switches of the prompt generator.

    width:  d, the text token-embedding width (= Q-Former hidden = CLIP embed dim).
    prompt_tokens: T, learnable prefix length.   object_tokens: m, compressed object tokens.
    query_tokens: M, Q-Former tokens per image (read from the features, not assumed).
    mix_tokens: the intermediate token count of the CLS→T branches (16 in the released code).
    object_hidden: the intermediate token count of the M→m object branch (8 in the released code).
    """

    width: int
    prompt_tokens: int = 24
    object_tokens: int = 4
    query_tokens: int = 16
    mix_tokens: int = 16
    object_hidden: int = 8
    extra_cls_branch: bool = True
    abnormal_object_activation: bool = False
    dropout: bool = True

    @classmethod
    def from_preset(cls, preset: Preset, width: int, query_tokens: int) -> "GeneratorConfig":
        return cls(
            width=width,
            query_tokens=query_tokens,
            extra_cls_branch=preset.extra_cls_branch,
            abnormal_object_activation=preset.abnormal_object_activation,
            dropout=preset.dropout,
        )

    @property
    def sequence_length(self) -> int:
        """T' = T + m, the number of prompt vectors fed to the text encoder."""
        return self.prompt_tokens + self.object_tokens

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class TokenMix(nn.Module):
    """A Linear along the token axis: (B, a, d) -> (B, b, d), the same weights for every channel.

    The released code applies `nn.Linear(a, b)` to the transposed (d × a) matrix; this is that layer
    with the transposes folded in, so its parameter is still an `nn.Linear` (same init, same keys).
    """

    def __init__(self, tokens_in: int, tokens_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(tokens_in, tokens_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.transpose(1, 2)).transpose(1, 2)


def _dropout(rate: float, enabled: bool) -> nn.Module:
    return nn.Dropout(rate) if enabled else nn.Identity()


def _activation() -> nn.LeakyReLU:
    return nn.LeakyReLU(LEAKY_SLOPE)


class SharedClsBranch(nn.Module):
    """f_p: c -> (B, T, d). Channel Linear + Drop + LReLU, then token mixing 1 -> T (no activation).

    The output is rank 1 in the channels (T scaled copies of one vector plus per-token constants).
    """

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        d = config.width
        self.channel = nn.Sequential(nn.Linear(d, d), _dropout(CHANNEL_DROPOUT, config.dropout), _activation())
        self.tokens = TokenMix(1, config.prompt_tokens)

    def forward(self, c: Tensor) -> Tensor:
        return self.tokens(self.channel(c).unsqueeze(1))


class ClsToPrompt(nn.Module):
    """c -> (B, T, d) through token mixing 1 -> 16 + LReLU, a channel Linear + Drop + LReLU, and
    token mixing 16 -> T.

    Used for g_n/g_a (last mixing followed by Drop 0.1 + LReLU) and f_n/f_a (no final activation).
    """

    def __init__(self, config: GeneratorConfig, final_activation: bool) -> None:
        super().__init__()
        d, mix = config.width, config.mix_tokens
        self.expand = nn.Sequential(TokenMix(1, mix), _activation())
        self.channel = nn.Sequential(nn.Linear(d, d), _dropout(CHANNEL_DROPOUT, config.dropout), _activation())
        layers: list[nn.Module] = [TokenMix(mix, config.prompt_tokens)]
        if final_activation:
            layers += [_dropout(TOKEN_DROPOUT, config.dropout), _activation()]
        self.out = nn.Sequential(*layers)

    def forward(self, c: Tensor) -> Tensor:
        return self.out(self.channel(self.expand(c.unsqueeze(1))))


class StateBranch(nn.Module):
    """Everything specific to one state (normal or abnormal) except the prefix P / N."""

    def __init__(self, config: GeneratorConfig, object_activation: bool) -> None:
        super().__init__()
        d, M = config.width, config.query_tokens
        self.cls_branch = ClsToPrompt(config, final_activation=True) if config.extra_cls_branch else None
        # Z^n: channel MLP + token mixing M -> M (the paper's "linear projection").
        self.project = nn.Sequential(
            nn.Linear(d, d), _dropout(CHANNEL_DROPOUT, config.dropout), _activation(), TokenMix(M, M)
        )
        self.attention = nn.MultiheadAttention(d, num_heads=1, batch_first=True)
        self.attended = ClsToPrompt(config, final_activation=False)
        # O^n: token mixing M -> 8 -> m on the raw Z, no channel mixing.
        first: list[nn.Module] = [TokenMix(M, config.object_hidden)]
        if object_activation:
            first.append(_activation())
        self.objects = nn.Sequential(*first, TokenMix(config.object_hidden, config.object_tokens), _activation())

    def forward(self, z: Tensor, c: Tensor, shared: Tensor) -> tuple[Tensor, Tensor]:
        """(C, O): C (B, T, d) = f_p(c) + g(c) + f(CA(c, Z', Z')), O (B, m, d)."""
        keys = self.project(z)
        attended, _ = self.attention(c.unsqueeze(1), keys, keys, need_weights=False)
        context = shared + self.attended(attended.squeeze(1))
        if self.cls_branch is not None:
            context = context + self.cls_branch(c)
        return context, self.objects(z)


class PromptGenerator(nn.Module):
    """Eqs. 2-4: (Z (B, M, d), c (B, d)) -> (S^n, S^a), each (B, T + m, d)."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        shape = (1, config.prompt_tokens, config.width)
        self.normal_prefix = nn.Parameter(torch.randn(shape))
        self.abnormal_prefix = nn.Parameter(torch.randn(shape))
        self.shared = SharedClsBranch(config)
        self.normal = StateBranch(config, object_activation=True)
        self.abnormal = StateBranch(config, object_activation=config.abnormal_object_activation)
        self._init_linears()

    def _init_linears(self) -> None:
        """Kaiming-normal (fan_in, gain √2) weights and zero biases for every nn.Linear, including
        the attention out_proj (an nn.Linear subclass); the attention in_proj keeps PyTorch's
        default (xavier-uniform, zero bias), as in the released code."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="leaky_relu", a=0.0)
                nn.init.zeros_(module.bias)

    def forward(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        if z.ndim != 3 or c.ndim != 2 or z.shape[0] != c.shape[0]:
            raise ValueError(f"expected z (B, M, d) and c (B, d), got {tuple(z.shape)} and {tuple(c.shape)}")
        shared = self.shared(c)
        normal_context, normal_objects = self.normal(z, c, shared)
        abnormal_context, abnormal_objects = self.abnormal(z, c, shared)
        s_normal = torch.cat([self.normal_prefix + normal_context, normal_objects], dim=1)
        s_abnormal = torch.cat([self.abnormal_prefix + abnormal_context, abnormal_objects], dim=1)
        return s_normal, s_abnormal
