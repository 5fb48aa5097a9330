"""Monarch layers for any shape: two block-diagonal factors with the fixed transpose permutation between
them (Dao et al., 2022), generalised to rectangular matrices by zero-padding each side.

With ``b`` input blocks of ``q = ceil(in/b)`` columns, ``s`` output blocks of ``p = ceil(out/s)`` rows
and rank ``k``: the first factor maps each input block to ``s k`` values (``L``: (b, q, s k)), the
permutation sends values ``j k .. j k + k - 1`` of block ``i`` to output block ``j``, and the second
factor maps the ``b k`` values each output block receives to its ``p`` rows (``R``: (s, b k, p)). Entry
``W[j p + u, i q + v] = sum_r R[j, i k + r, u] L[i, v, j k + r]``, so every ``p x q`` block of the (padded)
matrix has rank ``k`` and the best projection is a rank-``k`` SVD per block. Cost ``b s k (p + q)``.
Sized for a budget the way its authors use it: about ``sqrt(n)`` blocks on each side and the rank the
budget affords (``b = s = sqrt(n)``, ``k = 1`` is the classic square Monarch); where even rank 1 costs too
much, more blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import thin_svd
from .base import StructuredLinear, check_features, unreachable_budget

__all__ = ["MonarchLinear"]


def _cost(m: int, n: int, b: int, s: int, k: int = 1) -> int:
    return b * s * k * (math.ceil(n / b) + math.ceil(m / s))


class MonarchLinear(StructuredLinear):
    family = "monarch"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, num_blocks: int,
                 out_blocks: int | None = None, rank: int = 1, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features)
        b = check_features("num_blocks", num_blocks)
        s = b if out_blocks is None else check_features("out_blocks", out_blocks)
        k = check_features("rank", rank)
        if b > in_features or s > out_features:
            raise ValueError(f"num_blocks={b} and out_blocks={s} must not exceed in_features={in_features} "
                             f"and out_features={out_features}")
        self.num_blocks, self.out_blocks, self.rank = b, s, k
        self.in_block, self.out_block = math.ceil(in_features / b), math.ceil(out_features / s)
        if k > min(self.in_block, self.out_block):
            raise ValueError(f"rank={k} must not exceed the blocks' sides ({self.out_block} x {self.in_block})")
        factory = {"device": device, "dtype": dtype}
        self.left = nn.Parameter(torch.empty(b, self.in_block, s * k, **factory))
        self.right = nn.Parameter(torch.empty(s, b * k, self.out_block, **factory))
        self._init_bias(bias, factory)
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():  # the product's entries get nn.Linear's variance
            self.left.uniform_(-1 / math.sqrt(self.in_block), 1 / math.sqrt(self.in_block))
            self.right.uniform_(-1 / math.sqrt(b * k), 1 / math.sqrt(b * k)).mul_(math.sqrt(self.in_block) * bound * math.sqrt(3))

    @classmethod
    def size_for_budget(cls, in_features, out_features, budget, **options) -> dict:
        m, n = out_features, in_features
        target = budget * m * n
        # About sqrt(n) input and sqrt(m) output blocks (between half and twice that), the rank and the
        # block count that spend the most of the budget; ties go to the block count nearest sqrt(n).
        root = math.sqrt(n)
        candidates = []
        for b in range(max(1, round(root / 2)), min(n, round(2 * root)) + 1):
            s = min(m, max(1, round(b * math.sqrt(m / n))))
            for k in range(1, min(math.ceil(n / b), math.ceil(m / s)) + 1):
                if _cost(m, n, b, s, k) <= target:
                    candidates.append((_cost(m, n, b, s, k), -abs(b - root), b, s, k))
        if candidates:
            _, _, b, s, k = max(candidates)
            return {"num_blocks": b, "out_blocks": s, "rank": k}
        # Below rank 1 at about sqrt(n) blocks: more blocks of rank 1 (b = s; the cost is not monotone
        # in b because of padding, so take the largest cost within the budget).
        best = max((b for b in range(1, min(m, n) + 1) if _cost(m, n, b, b) <= target),
                   key=lambda b: _cost(m, n, b, b), default=None)
        if best is None:
            raise unreachable_budget(cls.family, n, m, budget, _cost(m, n, 1, 1) / (m * n))
        return {"num_blocks": best, "out_blocks": best, "rank": 1}

    def _padded_dense(self) -> torch.Tensor:
        # blocks[j, i] = sum_r R[j, i k + r, :] outer L[i, :, j k + r]  -> (s, b, p, q)
        s, b, k, p, q = self.out_blocks, self.num_blocks, self.rank, self.out_block, self.in_block
        right = self.right.reshape(s, b, k, p)
        left = self.left.reshape(b, q, s, k)
        blocks = torch.einsum("jiru,ivjr->jiuv", right, left)
        return blocks.permute(0, 2, 1, 3).reshape(s * p, b * q)

    def project_(self, weight: torch.Tensor) -> None:
        m, n = weight.shape
        s, b, p, q = self.out_blocks, self.num_blocks, self.out_block, self.in_block
        padded = weight.new_zeros(s * p, b * q, dtype=torch.float64)
        padded[:m, :n] = weight
        blocks = padded.reshape(s, p, b, q).permute(0, 2, 1, 3)  # (s, b, p, q)
        u, sv, vh = thin_svd(blocks)
        k = self.rank
        root = sv[..., :k].sqrt()  # (s, b, k)
        right = u[..., :, :k] * root[..., None, :]  # (s, b, p, k)
        left = vh[..., :k, :] * root[..., :, None]  # (s, b, k, q)
        self.right.copy_(right.permute(0, 1, 3, 2).reshape(s, b * k, p))
        self.left.copy_(left.permute(1, 3, 0, 2).reshape(b, q, s * k))

    def constructor_options(self) -> dict:
        return {"num_blocks": self.num_blocks, "out_blocks": self.out_blocks, "rank": self.rank}

    def macs_per_token(self) -> int:
        return self.num_blocks * self.out_blocks * self.rank * (self.in_block + self.out_block)

    def effective_parameters(self) -> int:
        return self.left.numel() + self.right.numel() + self._bias_size()

    def to_dense(self) -> torch.Tensor:
        return self._padded_dense()[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.dense_execution:  # at high budgets p and q are 2 to 4: the block products run 4-20x slower
            return self.dense_forward(x)
        lead = x.shape[:-1]
        b, s, k, q, p = self.num_blocks, self.out_blocks, self.rank, self.in_block, self.out_block
        flat = F.pad(x.reshape(-1, self.in_features), (0, b * q - self.in_features))
        h = torch.bmm(flat.reshape(-1, b, q).transpose(0, 1), self.left)  # (b, tokens, s k)
        # value j k + r of input block i goes to output block j, as its input i k + r
        h = h.reshape(b, -1, s, k).permute(2, 1, 0, 3).reshape(s, -1, b * k)  # (s, tokens, b k)
        y = torch.bmm(h, self.right)  # (s, tokens, p)
        y = y.transpose(0, 1).reshape(-1, s * p)[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)
