"""The interface every structured linear layer answers, so that comparisons are fair by construction."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["StructuredLinear", "check_features"]


def check_features(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class StructuredLinear(nn.Module):
    """Base of the structured drop-ins for :class:`torch.nn.Linear`.

    Subclasses compute ``y = x W^T + b`` for some structured ``W`` of shape ``(out_features,
    in_features)`` and report the cost of computing it the structured way.
    """

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

    # --- shared helpers --------------------------------------------------------------------------
    @property
    def dense_macs_per_token(self) -> int:
        return self.in_features * self.out_features

    def relative_cost(self) -> float:
        """Structured cost as a fraction of the dense layer of the same shape."""
        return self.macs_per_token() / self.dense_macs_per_token

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input's last dimension must be in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
