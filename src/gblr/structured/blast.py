"""BLAST layers (Lee et al., 2024): a ``b x b`` grid of blocks, block ``(i, j) = U_i diag(s_ij) V_j^T``,
with the factors ``U_i`` shared along block row ``i`` and ``V_j`` along block column ``j``. Blocks are
``ceil(out/b) x ceil(in/b)`` (zero-padded). Cost ``rank (in_pad + out_pad) + rank b^2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import thin_svd
from .base import StructuredLinear, check_features, unreachable_budget

__all__ = ["BlastLinear"]


def _default_blocks(m: int, n: int) -> int:
    return max(1, round(min(m, n) / 64))  # blocks of about 64 rows/columns


def _cost(m: int, n: int, b: int, rank: int) -> int:
    return rank * (b * math.ceil(n / b) + b * math.ceil(m / b) + b * b)


def _leading_vectors(matrices: torch.Tensor, count: int) -> torch.Tensor:
    """Leading left singular vectors; beyond the matrices' rank, small random directions (a zero
    start would be a saddle point of the projection)."""
    vectors = thin_svd(matrices)[0][..., :count]
    missing = count - vectors.shape[-1]
    if missing > 0:
        extra = 1e-2 * torch.randn(*vectors.shape[:-1], missing, dtype=vectors.dtype, device=vectors.device)
        vectors = torch.cat([vectors, extra], dim=-1)
    return vectors


class BlastLinear(StructuredLinear):
    family = "blast"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int,
                 num_blocks: int | None = None, project_steps: int = 300, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features)
        b = _default_blocks(out_features, in_features) if num_blocks is None else check_features("num_blocks", num_blocks)
        if b > min(in_features, out_features):
            raise ValueError(f"num_blocks must be <= min(in_features, out_features), got {b}")
        self.num_blocks, self.rank, self.project_steps = b, check_features("rank", rank), project_steps
        self.in_block, self.out_block = math.ceil(in_features / b), math.ceil(out_features / b)
        factory = {"device": device, "dtype": dtype}
        self.in_factors = nn.Parameter(torch.empty(b, self.in_block, rank, **factory))  # V_j
        self.out_factors = nn.Parameter(torch.empty(b, rank, self.out_block, **factory))  # U_i^T
        self.coupling = nn.Parameter(torch.empty(rank, b, b, **factory))  # s[k, j, i]
        self._init_bias(bias, factory)
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.in_factors.uniform_(-bound, bound)
            self.out_factors.uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank))
            self.coupling.uniform_(-1 / math.sqrt(b), 1 / math.sqrt(b))

    @classmethod
    def size_for_budget(cls, in_features, out_features, budget, num_blocks: int | None = None, **options) -> dict:
        m, n = out_features, in_features
        b = _default_blocks(m, n) if num_blocks is None else num_blocks
        rank = min(math.floor(budget * m * n / _cost(m, n, b, 1)), min(m, n))
        if rank < 1:
            raise unreachable_budget(cls.family, n, m, budget, _cost(m, n, b, 1) / (m * n))
        return {"rank": rank, "num_blocks": b}

    def _padded_dense(self) -> torch.Tensor:
        # block (i, j) = U_i diag(s_ij) V_j^T -> (b_i, b_j, p, q)
        blocks = torch.einsum("ikp,kji,jqk->ijpq", self.out_factors, self.coupling, self.in_factors)
        b, _, p, q = blocks.shape
        return blocks.permute(0, 2, 1, 3).reshape(b * p, b * q)

    def project_(self, weight: torch.Tensor) -> None:
        """Closed-form start (block-row/column singular vectors, optimal diagonal couplings), then Adam
        on the relative Frobenius error."""
        m, n = weight.shape
        b, p, q, r = self.num_blocks, self.out_block, self.in_block, self.rank
        target = weight.new_zeros(b * p, b * q, dtype=torch.float64)
        target[:m, :n] = weight
        grid = target.reshape(b, p, b, q)
        u = _leading_vectors(grid.reshape(b, p, b * q), r)  # (b, p, r)
        v = _leading_vectors(grid.permute(2, 3, 0, 1).reshape(b, q, b * p), r)  # (b, q, r)
        coupling = torch.einsum("ipk,ipjq,jqk->kji", u, grid, v)
        params = [u.clone().requires_grad_(), coupling.clone().requires_grad_(), v.clone().requires_grad_()]
        optimizer = torch.optim.Adam(params, lr=1e-2)
        scale = target.pow(2).sum()
        with torch.enable_grad():
            for _ in range(self.project_steps):
                approx = torch.einsum("ipk,kji,jqk->ipjq", *params)
                loss = (approx - grid).pow(2).sum() / scale
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        u, coupling, v = (t.detach() for t in params)
        self.out_factors.copy_(u.transpose(1, 2))
        self.coupling.copy_(coupling)
        self.in_factors.copy_(v)

    def constructor_options(self) -> dict:
        return {"rank": self.rank, "num_blocks": self.num_blocks}

    def macs_per_token(self) -> int:
        b, r = self.num_blocks, self.rank
        return r * (b * self.in_block + b * self.out_block + b * b)

    def effective_parameters(self) -> int:
        return sum(p.numel() for p in (self.in_factors, self.out_factors, self.coupling)) + self._bias_size()

    def to_dense(self) -> torch.Tensor:
        return self._padded_dense()[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        lead = x.shape[:-1]
        b, q = self.num_blocks, self.in_block
        flat = F.pad(x.reshape(-1, self.in_features), (0, b * q - self.in_features))
        z = torch.bmm(flat.reshape(-1, b, q).transpose(0, 1), self.in_factors)  # (b_j, tokens, r)
        w = torch.bmm(z.permute(2, 1, 0), self.coupling)  # (r, tokens, b_i)
        y = torch.bmm(w.permute(2, 1, 0), self.out_factors)  # (b_i, tokens, p)
        y = y.transpose(0, 1).reshape(-1, b * self.out_block)[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)
