"""Pixelated-Butterfly-style layers: a fixed flat-butterfly block-sparse pattern plus a low-rank term
(Chen et al., 2022). The pattern on a ``g x g`` block grid (``g`` a power of two) keeps block ``(i, j)``
when ``i XOR j`` is 0 or one of the first ``levels`` powers of two; blocks are ``ceil(out/g) x
ceil(in/g)`` (zero-padded). Cost ``g (1 + levels) bh bw + rank (in + out)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import thin_svd
from .base import StructuredLinear, check_features, unreachable_budget

__all__ = ["PixelflyLinear", "flat_butterfly_pattern"]


def flat_butterfly_pattern(grid: int, levels: int) -> torch.Tensor:
    """Boolean (grid, grid) pattern: diagonal plus butterfly strides 1, 2, 4, ... (``levels`` of them)."""
    i = torch.arange(grid)
    xor = i[:, None] ^ i[None, :]
    keep = xor == 0
    for level in range(levels):
        keep |= xor == (1 << level)
    return keep


def _sparse_cost(m: int, n: int, grid: int, levels: int) -> int:
    return grid * (1 + levels) * math.ceil(m / grid) * math.ceil(n / grid)


class PixelflyLinear(StructuredLinear):
    family = "pixelfly"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, grid: int, levels: int,
                 rank: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features)
        g = check_features("grid", grid)
        if g & (g - 1) or g > min(in_features, out_features):
            raise ValueError(f"grid must be a power of two <= min(in_features, out_features), got {grid}")
        if not (0 <= levels <= int(math.log2(g))):
            raise ValueError(f"levels must be in [0, log2(grid)={int(math.log2(g))}], got {levels}")
        self.grid, self.levels, self.rank = g, levels, check_features("rank", rank)
        self.block_rows, self.block_cols = math.ceil(out_features / g), math.ceil(in_features / g)
        rows, cols = flat_butterfly_pattern(g, levels).nonzero(as_tuple=True)
        self.register_buffer("block_row_index", rows, persistent=False)
        self.register_buffer("block_col_index", cols, persistent=False)
        factory = {"device": device, "dtype": dtype}
        self.blocks = nn.Parameter(torch.empty(len(rows), self.block_cols, self.block_rows, **factory))
        self.in_proj = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.out_proj = nn.Parameter(torch.empty(out_features, rank, **factory))
        self._init_bias(bias, factory)
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.blocks.uniform_(-bound, bound)
            self.in_proj.uniform_(-bound, bound)
            self.out_proj.uniform_(-bound, bound)

    @classmethod
    def size_for_budget(cls, in_features, out_features, budget, **options) -> dict:
        m, n = out_features, in_features
        target = budget * m * n
        # About half of the budget to the butterfly blocks (the largest pattern that fits, larger blocks
        # first), the rest to the low-rank term.
        candidates = [
            (_sparse_cost(m, n, 1 << e, levels), -(1 << e), levels)
            for e in range(int(math.log2(min(m, n))) + 1)
            for levels in range(e + 1)
        ]
        fitting = [c for c in candidates if c[0] <= target / 2]
        if fitting:
            cost, neg_grid, levels = max(fitting)
        else:  # the smallest pattern, if the low-rank term still fits beside it
            cost, neg_grid, levels = min(candidates)
        rank = min(math.floor((target - cost) / (m + n)), min(m, n))
        if rank < 1:
            smallest = (min(candidates)[0] + m + n) / (m * n)
            raise unreachable_budget(cls.family, n, m, budget, smallest)
        return {"grid": -neg_grid, "levels": levels, "rank": rank}

    def _sparse_dense(self) -> torch.Tensor:
        g, bh, bw = self.grid, self.block_rows, self.block_cols
        dense = self.blocks.new_zeros(g, g, bh, bw)
        dense = dense.index_put((self.block_row_index, self.block_col_index), self.blocks.transpose(1, 2))
        return dense.permute(0, 2, 1, 3).reshape(g * bh, g * bw)[: self.out_features, : self.in_features]

    def project_(self, weight: torch.Tensor) -> None:
        """Alternate: blocks = pattern part of (W - low-rank), low-rank = truncated SVD of (W - blocks)."""
        g, bh, bw = self.grid, self.block_rows, self.block_cols
        m, n = weight.shape
        target = weight.to(torch.float64)
        low = torch.zeros_like(target)
        for _ in range(5):
            padded = target.new_zeros(g * bh, g * bw)
            padded[:m, :n] = target - low
            grid = padded.reshape(g, bh, g, bw).permute(0, 2, 1, 3)  # (g, g, bh, bw)
            self.blocks.copy_(grid[self.block_row_index, self.block_col_index].transpose(1, 2))
            p, s, qh = thin_svd(target - self._sparse_dense().to(torch.float64))
            low = (p[:, : self.rank] * s[: self.rank]) @ qh[: self.rank]
        root = s[: self.rank].sqrt()
        self.out_proj.copy_(p[:, : self.rank] * root)
        self.in_proj.copy_(root[:, None] * qh[: self.rank])

    def constructor_options(self) -> dict:
        return {"grid": self.grid, "levels": self.levels, "rank": self.rank}

    def macs_per_token(self) -> int:
        return self.blocks.shape[0] * self.block_rows * self.block_cols + self.rank * (self.in_features + self.out_features)

    def effective_parameters(self) -> int:
        return sum(p.numel() for p in (self.blocks, self.in_proj, self.out_proj)) + self._bias_size()

    def to_dense(self) -> torch.Tensor:
        return self._sparse_dense() + self.out_proj @ self.in_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.dense_execution:
            return self.dense_forward(x)
        lead = x.shape[:-1]
        g, bh, bw = self.grid, self.block_rows, self.block_cols
        flat = x.reshape(-1, self.in_features)
        tokens = flat.shape[0]
        xs = F.pad(flat, (0, g * bw - self.in_features)).reshape(tokens, g, bw)
        ys = torch.bmm(xs[:, self.block_col_index].transpose(0, 1), self.blocks)  # (nnz, tokens, bh)
        out = ys.new_zeros(g, tokens, bh).index_add_(0, self.block_row_index, ys)
        y = out.transpose(0, 1).reshape(tokens, g * bh)[:, : self.out_features]
        y = y + F.linear(F.linear(flat, self.in_proj), self.out_proj, self.bias)
        return y.reshape(*lead, self.out_features)
