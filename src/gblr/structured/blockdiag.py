"""Block-diagonal layers: ``k - 1`` equal blocks plus one last block that takes the remaining rows and
columns, so that any budget in [1/min(in, out), 1] is reachable, not only 1/k."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import StructuredLinear, check_features, unreachable_budget

__all__ = ["BlockDiagonalLinear"]


def _cost(m: int, n: int, k: int, rows: int, cols: int) -> int:
    return (k - 1) * rows * cols + (m - (k - 1) * rows) * (n - (k - 1) * cols)


class BlockDiagonalLinear(StructuredLinear):
    """``num_blocks - 1`` blocks of ``block_rows x block_cols`` on the diagonal, then one last block.

    Cost ``(k-1) a c + (out - (k-1) a)(in - (k-1) c)``; the projection (copying the diagonal blocks of
    a dense matrix) is optimal in Frobenius norm.
    """

    family = "blockdiag"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, num_blocks: int,
                 block_rows: int | None = None, block_cols: int | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features)
        k = check_features("num_blocks", num_blocks)
        if k > min(in_features, out_features):
            raise ValueError(f"num_blocks must be <= min(in_features, out_features)={min(in_features, out_features)}, got {k}")
        a = out_features // k if block_rows is None else check_features("block_rows", block_rows)
        c = in_features // k if block_cols is None else check_features("block_cols", block_cols)
        if (k - 1) * a >= out_features or (k - 1) * c >= in_features:
            raise ValueError(f"{k - 1} blocks of {a}x{c} leave no room for the last block in {out_features}x{in_features}")
        self.num_blocks, self.block_rows, self.block_cols = k, a, c
        factory = {"device": device, "dtype": dtype}
        self.blocks = nn.Parameter(torch.empty(k - 1, a, c, **factory))  # (k-1, rows, cols)
        self.last_block = nn.Parameter(torch.empty(out_features - (k - 1) * a, in_features - (k - 1) * c, **factory))
        self._init_bias(bias, factory)
        with torch.no_grad():
            self.blocks.uniform_(-1 / math.sqrt(c), 1 / math.sqrt(c))
            self.last_block.uniform_(-1 / math.sqrt(self.last_block.shape[1]), 1 / math.sqrt(self.last_block.shape[1]))

    @classmethod
    def size_for_budget(cls, in_features, out_features, budget, **options) -> dict:
        m, n = out_features, in_features
        target = budget * m * n
        for k in range(max(1, math.ceil(1 / budget)), min(m, n) + 1):
            if k == 1:
                return {"num_blocks": 1}
            # Cost decreases as the k-1 equal blocks grow towards 1/k of each side: take the smallest
            # that fits, i.e. the largest cost within the budget.
            for rows in range(1, m // k + 1):
                cols = min(max(1, round(rows * n / m)), n // k)
                if _cost(m, n, k, rows, cols) <= target:
                    return {"num_blocks": k, "block_rows": rows, "block_cols": cols}
        k = min(m, n)
        raise unreachable_budget(cls.family, n, m, budget, _cost(m, n, k, m // k, n // k) / (m * n))

    def _split(self):
        k, a, c = self.num_blocks, self.block_rows, self.block_cols
        return (k - 1) * a, (k - 1) * c

    def project_(self, weight: torch.Tensor) -> None:
        k, a, c = self.num_blocks, self.block_rows, self.block_cols
        for i in range(k - 1):
            self.blocks[i].copy_(weight[i * a : (i + 1) * a, i * c : (i + 1) * c])
        rows, cols = self._split()
        self.last_block.copy_(weight[rows:, cols:])

    def constructor_options(self) -> dict:
        return {"num_blocks": self.num_blocks, "block_rows": self.block_rows, "block_cols": self.block_cols}

    def macs_per_token(self) -> int:
        return _cost(self.out_features, self.in_features, self.num_blocks, self.block_rows, self.block_cols)

    def effective_parameters(self) -> int:
        return self.blocks.numel() + self.last_block.numel() + self._bias_size()

    def to_dense(self) -> torch.Tensor:
        return torch.block_diag(*self.blocks.unbind(0), self.last_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        rows, cols = self._split()
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        parts = []
        if self.num_blocks > 1:
            xs = flat[:, :cols].reshape(-1, self.num_blocks - 1, self.block_cols).transpose(0, 1)
            ys = torch.bmm(xs, self.blocks.transpose(1, 2))  # (k-1, tokens, rows)
            parts.append(ys.transpose(0, 1).reshape(-1, rows))
        parts.append(F.linear(flat[:, cols:], self.last_block))
        y = torch.cat(parts, dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)
