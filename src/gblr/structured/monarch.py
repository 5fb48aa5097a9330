"""Monarch layers for any shape: two block-diagonal factors with the fixed transpose permutation between
them (Dao et al., 2022), generalised to rectangular matrices by zero-padding each side.

With ``b`` input blocks of ``q = ceil(in/b)`` columns and ``s`` output blocks of ``p = ceil(out/s)``
rows: the first factor maps each input block to ``s`` values (``L``: (b, q, s)), the permutation sends
value ``j`` of block ``i`` to output block ``j``, and the second factor maps the ``b`` values each output
block receives to its ``p`` rows (``R``: (s, b, p)). Entry ``W[j p + u, i q + v] = R[j, i, u] L[i, v, j]``,
so every ``p x q`` block of the (padded) matrix is rank 1 and the best projection is a rank-1 SVD per
block. Cost ``b s (p + q)``. The classic square Monarch is ``b = s = sqrt(n)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import StructuredLinear, check_features, unreachable_budget

__all__ = ["MonarchLinear"]


def _cost(m: int, n: int, b: int, s: int) -> int:
    return b * s * (math.ceil(n / b) + math.ceil(m / s))


class MonarchLinear(StructuredLinear):
    family = "monarch"
    #: Run through the effective dense weight instead (the same function, differentiable, not saved):
    #: at high budgets the blocks are tiny (``p, q`` of 2 to 4) and their products run 10-20x slower
    #: than one dense matmul on CPU; quality benchmarks set this to finish in time.
    dense_execution: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, num_blocks: int,
                 out_blocks: int | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features)
        b = check_features("num_blocks", num_blocks)
        s = b if out_blocks is None else check_features("out_blocks", out_blocks)
        if b > in_features or s > out_features:
            raise ValueError(f"num_blocks={b} and out_blocks={s} must not exceed in_features={in_features} "
                             f"and out_features={out_features}")
        self.num_blocks, self.out_blocks = b, s
        self.in_block, self.out_block = math.ceil(in_features / b), math.ceil(out_features / s)
        factory = {"device": device, "dtype": dtype}
        self.left = nn.Parameter(torch.empty(b, self.in_block, s, **factory))
        self.right = nn.Parameter(torch.empty(s, b, self.out_block, **factory))
        self._init_bias(bias, factory)
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.left.uniform_(-1 / math.sqrt(self.in_block), 1 / math.sqrt(self.in_block))
            self.right.uniform_(-1 / math.sqrt(b), 1 / math.sqrt(b)).mul_(math.sqrt(self.in_block) * bound * math.sqrt(3))

    @classmethod
    def size_for_budget(cls, in_features, out_features, budget, **options) -> dict:
        m, n = out_features, in_features
        target = budget * m * n
        # b = s; the cost is not monotone in b (padding), so take the largest cost within the budget.
        best = max((b for b in range(1, min(m, n) + 1) if _cost(m, n, b, b) <= target),
                   key=lambda b: _cost(m, n, b, b), default=None)
        if best is None:
            raise unreachable_budget(cls.family, n, m, budget, _cost(m, n, 1, 1) / (m * n))
        return {"num_blocks": best}

    def _padded_dense(self) -> torch.Tensor:
        # blocks[j, i] = R[j, i, :] outer L[i, :, j]  -> (s, b, p, q)
        blocks = torch.einsum("jiu,ivj->jiuv", self.right, self.left)
        s, b, p, q = blocks.shape
        return blocks.permute(0, 2, 1, 3).reshape(s * p, b * q)

    def project_(self, weight: torch.Tensor) -> None:
        m, n = weight.shape
        s, b, p, q = self.out_blocks, self.num_blocks, self.out_block, self.in_block
        padded = weight.new_zeros(s * p, b * q, dtype=torch.float64)
        padded[:m, :n] = weight
        blocks = padded.reshape(s, p, b, q).permute(0, 2, 1, 3)  # (s, b, p, q)
        u, sv, vh = torch.linalg.svd(blocks, full_matrices=False)
        root = sv[..., 0].sqrt()  # (s, b)
        self.right.copy_(u[..., :, 0] * root[..., None])  # (s, b, p)
        self.left.copy_((vh[..., 0, :] * root[..., None]).permute(1, 2, 0))  # (b, q, s)

    def constructor_options(self) -> dict:
        return {"num_blocks": self.num_blocks, "out_blocks": self.out_blocks}

    def macs_per_token(self) -> int:
        return self.num_blocks * self.out_blocks * (self.in_block + self.out_block)

    def effective_parameters(self) -> int:
        return self.left.numel() + self.right.numel() + self._bias_size()

    def to_dense(self) -> torch.Tensor:
        return self._padded_dense()[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.dense_execution:
            return F.linear(x, self.to_dense(), self.bias)
        lead = x.shape[:-1]
        b, s, q, p = self.num_blocks, self.out_blocks, self.in_block, self.out_block
        flat = F.pad(x.reshape(-1, self.in_features), (0, b * q - self.in_features))
        h = torch.bmm(flat.reshape(-1, b, q).transpose(0, 1), self.left)  # (b, tokens, s)
        y = torch.bmm(h.permute(2, 1, 0), self.right)  # (s, tokens, p)
        y = y.transpose(0, 1).reshape(-1, s * p)[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)
