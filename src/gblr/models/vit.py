"""A Vision Transformer for small images (e.g. 28x28 Fashion-MNIST with 4x4 patches)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block, PatchEmbed


class ViT(nn.Module):
    def __init__(self, image_size: int = 28, patch: int = 4, channels: int = 1, classes: int = 10, dim: int = 192,
                 depth: int = 6, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.embed = PatchEmbed(image_size, patch, channels, dim)
        tokens = self.embed.tokens
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.embed(images)
        x = torch.cat([self.cls.expand(len(patches), -1, -1), patches], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))
