"""Structured drop-ins for ``torch.nn.Linear``, all answering the :class:`StructuredLinear` interface, a
registry that builds any family by name for a budget (fitting one to a dense matrix is
:func:`gblr.fit.structured_from_dense`), and :class:`StructuredConv2d`, a convolution computed by them."""

from __future__ import annotations

from .base import StructuredLinear
from .blast import BlastLinear
from .blockdiag import BlockDiagonalLinear
from .conv import GBLRConv2d, StructuredConv2d
from .dense import DenseLinear
from .gblr import GBLRLinear
from .lowrank import LowRankLinear
from .monarch import MonarchLinear
from .pixelfly import PixelflyLinear

__all__ = [
    "StructuredLinear", "DenseLinear", "LowRankLinear", "BlockDiagonalLinear", "MonarchLinear",
    "PixelflyLinear", "BlastLinear", "GBLRLinear", "StructuredConv2d", "GBLRConv2d", "FAMILIES", "family_names", "family_class",
    "make_structured",
]

FAMILIES: dict[str, type[StructuredLinear]] = {
    cls.family: cls
    for cls in (DenseLinear, LowRankLinear, BlockDiagonalLinear, MonarchLinear, PixelflyLinear, BlastLinear, GBLRLinear)
}


def family_names() -> list[str]:
    return list(FAMILIES)


def family_class(name: str) -> type[StructuredLinear]:
    if name not in FAMILIES:
        raise ValueError(f"unknown structured family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def make_structured(name: str, in_features: int, out_features: int, budget: float, **options) -> StructuredLinear:
    """A new layer of family ``name`` whose cost is as close to ``budget`` (fraction of dense) as the
    family allows without exceeding it. ``options`` go to the family (e.g. ``bias``, ``dtype``)."""
    return family_class(name).for_budget(in_features, out_features, budget, **options)
