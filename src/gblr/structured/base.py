"""The interface every structured linear layer answers, so that comparisons are fair by construction, and
the argument checks the package shares (sizes, budgets, weights, finite rates and weights)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StructuredLinear", "check_features", "check_budget", "check_nonnegative", "check_positive", "unreachable_budget"]


def check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_number(name: str, value, positive: bool) -> float:
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value) -> float:
    """A rate, weight or penalty that may be zero: a finite real number >= 0 (not a bool)."""
    return _check_number(name, value, positive=False)


def check_positive(name: str, value) -> float:
    """A learning rate, damping or clipping norm: a finite real number > 0 (not a bool)."""
    return _check_number(name, value, positive=True)


def check_weight(weight) -> None:
    """A dense weight to fit: a non-empty 2-D tensor of finite values."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D tensor, got {getattr(weight, 'shape', weight)!r}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must hold finite values only; it holds NaN or infinity")


def check_budget(budget) -> float:
    """A budget is a fraction of the dense layer's MACs, in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (0.0 < budget <= 1.0):
        raise ValueError(f"budget must be a fraction of the dense cost in (0, 1], got {budget!r}")
    return float(budget)


def unreachable_budget(family: str, in_features: int, out_features: int, budget: float, smallest: float):
    return ValueError(
        f"budget {budget:g} is below the smallest budget {family} can reach for in_features={in_features}, "
        f"out_features={out_features}: {smallest:.6g}"
    )


class StructuredLinear(nn.Module):
    """Base of the structured drop-ins for :class:`torch.nn.Linear`.

    Subclasses compute ``y = x W^T + b`` for some structured ``W`` of shape ``(out_features,
    in_features)`` and report the cost of computing it the structured way.
    """

    #: Name of the family in the registry (:func:`gblr.structured.make_structured`).
    family: str = ""
    #: True for inference forms whose forward executes the structure (``compact``): a
    #: :class:`StructuredConv2d` then runs them on its patches instead of convolving with ``to_dense()``.
    executes_structure: bool = False
    #: Run through the effective dense weight (``to_dense()``) instead of the family's own block
    #: products: the same function, differentiable, not saved. Honoured by Monarch and Pixelfly, whose
    #: small blocks run several times slower than one dense matmul on CPU (quality studies set it to
    #: finish in time: ``structure.dense_execution`` in a training config); the other families run their
    #: own products (GBLR and low-rank already choose the cheaper of their executions).
    dense_execution: bool = False
    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = check_features("in_features", in_features)
        self.out_features = check_features("out_features", out_features)

    # --- what every structured layer must answer -------------------------------------------------
    def macs_per_token(self) -> int:
        """Multiply-accumulates per input vector (token) of the structured computation, bias excluded."""
        raise NotImplementedError

    def effective_parameters(self) -> int:
        """Number of weights the structured form needs (bias included)."""
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` matrix this layer currently multiplies by."""
        raise NotImplementedError

    @classmethod
    def to_be_overwritten(cls, in_features: int, out_features: int, **kwargs) -> "StructuredLinear":
        """A layer whose parameters the caller is about to overwrite (loading, fitting): the constructor
        with ``kwargs``, minus any costly random initialisation a family has."""
        return cls(in_features, out_features, **kwargs)

    # --- construction for a budget (every family in the registry implements these) ----------------
    @classmethod
    def size_for_budget(cls, in_features: int, out_features: int, budget: float, **options) -> dict:
        """The family's own size parameters whose cost is closest to ``budget`` without exceeding it."""
        raise NotImplementedError

    @classmethod
    def for_budget(cls, in_features: int, out_features: int, budget: float, *, bias: bool = True,
                   device=None, dtype=None, **options) -> "StructuredLinear":
        """A randomly initialised layer whose cost is at most ``budget`` of the dense cost."""
        sizes = cls.size_for_budget(in_features, out_features, check_budget(budget), **options)
        overridden = sorted(k for k in options if k in sizes and sizes[k] != options[k])
        if overridden:  # the budget decides these; a value given alongside would be silently replaced
            raise ValueError(f"options {overridden} of {cls.family} are set by the budget; leave them out")
        return cls(in_features, out_features, bias=bias, device=device, dtype=dtype, **(options | sizes))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, budget: float, bias: torch.Tensor | None = None,
                   **options) -> "StructuredLinear":
        """Project a dense ``(out, in)`` weight into the family at ``budget``; ``bias`` is copied."""
        check_weight(weight)
        out_features, in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls.for_budget(in_features, out_features, budget, bias=bias is not None,
                               device=weight.device, dtype=weight.dtype, **options)
        with torch.no_grad():
            layer.project_(weight.detach())
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def constructor_options(self) -> dict:
        """Keyword arguments that, with ``in_features``, ``out_features`` and ``bias``, rebuild a layer
        of this exact shape and structure (its tensors then come from a state dict)."""
        raise NotImplementedError

    def project_(self, weight: torch.Tensor) -> None:
        """Set this layer's weights to (an approximation of) the closest member of the family to ``weight``."""
        raise NotImplementedError

    # --- shared helpers ---
    def _init_bias(self, bias: bool, factory: dict) -> None:
        """A bias initialised like ``nn.Linear``'s, or a registered ``None``."""
        if bias:
            bound = 1.0 / self.in_features**0.5
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def _bias_size(self) -> int:
        return 0 if self.bias is None else self.bias.numel()

    @property
    def dense_macs_per_token(self) -> int:
        return self.in_features * self.out_features

    def relative_cost(self) -> float:
        """Structured cost as a fraction of the dense layer of the same shape."""
        return self.macs_per_token() / self.dense_macs_per_token

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` through the effective dense weight (what ``dense_execution`` selects)."""
        return F.linear(x, self.to_dense(), self.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input's last dimension must be in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
