"""A GPT-style decoder for (character-level) language modelling."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int = 256, dim: int = 256, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.context:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds the context of {self.context}")
        x = self.tokens(ids) + self.pos[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))
