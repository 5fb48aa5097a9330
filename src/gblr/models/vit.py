"""A Vision Transformer for small images (e.g. 28x28 Fashion-MNIST with 4x4 patches)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block


class ViT(nn.Module):
    def __init__(self, image_size: int = 28, patch: int = 4, channels: int = 1, classes: int = 10, dim: int = 192,
                 depth: int = 6, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size={image_size} must be divisible by patch={patch}")
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:  # (N, H, W) grey images
            images = images.unsqueeze(1)
        b, c, h, w = images.shape
        p = self.patch
        patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        x = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))
