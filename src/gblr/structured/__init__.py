"""Structured drop-ins for ``torch.nn.Linear``, all answering the :class:`StructuredLinear` interface,
and a registry that builds any family by name for a budget."""

from __future__ import annotations

import torch

from .base import StructuredLinear
from .blast import BlastLinear
from .blockdiag import BlockDiagonalLinear
from .dense import DenseLinear
from .gblr import GBLRLinear
from .lowrank import LowRankLinear
from .monarch import MonarchLinear
from .pixelfly import PixelflyLinear

__all__ = [
    "StructuredLinear", "DenseLinear", "LowRankLinear", "BlockDiagonalLinear", "MonarchLinear",
    "PixelflyLinear", "BlastLinear", "GBLRLinear", "FAMILIES", "family_names", "make_structured",
    "structured_from_dense",
]

FAMILIES: dict[str, type[StructuredLinear]] = {
    cls.family: cls
    for cls in (DenseLinear, LowRankLinear, BlockDiagonalLinear, MonarchLinear, PixelflyLinear, BlastLinear, GBLRLinear)
}


def family_names() -> list[str]:
    return list(FAMILIES)


def _family(name: str) -> type[StructuredLinear]:
    if name not in FAMILIES:
        raise ValueError(f"unknown structured family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def make_structured(name: str, in_features: int, out_features: int, budget: float, **options) -> StructuredLinear:
    """A new layer of family ``name`` whose cost is as close to ``budget`` (fraction of dense) as the
    family allows without exceeding it. ``options`` go to the family (e.g. ``bias``, ``dtype``)."""
    return _family(name).for_budget(in_features, out_features, budget, **options)


def structured_from_dense(name: str, weight: torch.Tensor, budget: float, bias: torch.Tensor | None = None,
                          **options) -> StructuredLinear:
    """Project a dense ``(out, in)`` weight into family ``name`` at ``budget``. The fit runs on the CPU
    (SVDs in float64, greedy choices on the host); the layer comes back on the weight's device."""
    bias = None if bias is None else bias.cpu()
    return _family(name).from_dense(weight.cpu(), budget, bias, **options).to(weight.device)
