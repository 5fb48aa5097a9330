"""The dense reference, under the same interface as the structured families."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import StructuredLinear, unreachable_budget

__all__ = ["DenseLinear"]


class DenseLinear(StructuredLinear):
    """``nn.Linear`` as a structured layer: cost ``in * out``; it can only meet a budget of 1."""

    family = "dense"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self._init_bias(bias, factory)
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    @classmethod
    def size_for_budget(cls, in_features, out_features, budget, **options) -> dict:
        if budget < 1.0:
            raise unreachable_budget(cls.family, in_features, out_features, budget, 1.0)
        return {}

    def project_(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight)

    def constructor_options(self) -> dict:
        return {}

    def macs_per_token(self) -> int:
        return self.in_features * self.out_features

    def effective_parameters(self) -> int:
        return self.weight.numel() + self._bias_size()

    def to_dense(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return F.linear(x, self.weight, self.bias)
