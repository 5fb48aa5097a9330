"""Low-rank layers ``W = U V`` with the optimal (truncated SVD) projection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import thin_svd
from .base import StructuredLinear, check_features, unreachable_budget

__all__ = ["LowRankLinear"]


class LowRankLinear(StructuredLinear):
    """``y = U (V x) + b`` with ``V``: (rank, in), ``U``: (out, rank); cost ``rank * (in + out)``."""

    family = "lowrank"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features)
        self.rank = check_features("rank", rank)
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.out_proj = nn.Parameter(torch.empty(out_features, rank, **factory))
        self._init_bias(bias, factory)
        # Product variance of nn.Linear's init: each factor gets the square root of its scale.
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.in_proj.uniform_(-bound, bound)
            self.out_proj.uniform_(-math.sqrt(3.0 / rank), math.sqrt(3.0 / rank)).mul_(bound)

    @classmethod
    def size_for_budget(cls, in_features, out_features, budget, **options) -> dict:
        rank = min(math.floor(budget * in_features * out_features / (in_features + out_features)),
                   min(in_features, out_features))
        if rank < 1:
            smallest = (in_features + out_features) / (in_features * out_features)
            raise unreachable_budget(cls.family, in_features, out_features, budget, smallest)
        return {"rank": rank}

    def project_(self, weight: torch.Tensor) -> None:
        p, s, qh = thin_svd(weight.to(torch.float64))
        root = s[: self.rank].sqrt()
        self.out_proj.copy_(p[:, : self.rank] * root)
        self.in_proj.copy_(root[:, None] * qh[: self.rank])

    def constructor_options(self) -> dict:
        return {"rank": self.rank}

    def macs_per_token(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def effective_parameters(self) -> int:
        return self.in_proj.numel() + self.out_proj.numel() + self._bias_size()

    def to_dense(self) -> torch.Tensor:
        return self.out_proj @ self.in_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return F.linear(F.linear(x, self.in_proj), self.out_proj, self.bias)
