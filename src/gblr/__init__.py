"""gblr: learned Generalized Block Low-Rank structured layers for PyTorch."""

from .structured import GBLRLinear, StructuredLinear

__all__ = ["GBLRLinear", "StructuredLinear"]
__version__ = "0.1.0"
