"""MLP-Mixer for small images: token-mixing and channel-mixing MLPs."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import MLP, PatchEmbed


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mix = MLP(tokens, token_hidden)
        self.channel_mix = MLP(dim, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mix(self.norm2(x))


class MLPMixer(nn.Module):
    def __init__(self, image_size: int = 28, patch: int = 4, channels: int = 1, classes: int = 10, dim: int = 192,
                 depth: int = 6, token_ratio: float = 2.0, channel_ratio: float = 4.0) -> None:
        super().__init__()
        self.embed = PatchEmbed(image_size, patch, channels, dim)
        tokens = self.embed.tokens
        self.blocks = nn.ModuleList(
            MixerBlock(tokens, dim, max(1, int(tokens * token_ratio)), int(dim * channel_ratio)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))
