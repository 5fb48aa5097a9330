"""Structured drop-ins for ``torch.nn.Linear``, all answering the :class:`StructuredLinear` interface."""

from .base import StructuredLinear
from .gblr import GBLRLinear

__all__ = ["StructuredLinear", "GBLRLinear"]
