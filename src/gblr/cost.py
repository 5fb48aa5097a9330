"""Honest cost accounting of a whole model.

The dense parts of a model are measured with PyTorch's own ``FlopCounterMode``. Each structured layer is
counted by its *effective* cost (the structure it has learned, :meth:`StructuredLinear.macs_per_token`),
never by the masked dense matmul it may run while training: during the measurement every structured
layer is swapped for a probe that records its number of tokens and returns zeros of the right shape, so
the surrounding computation runs with the same shapes and the probe itself adds no FLOPs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .structured.base import StructuredLinear

__all__ = ["LayerCost", "CostReport", "cost_report"]


@dataclass
class LayerCost:
    name: str
    kind: str
    in_features: int
    out_features: int
    tokens: int
    macs_per_token: int
    dense_macs_per_token: int
    parameters: int
    dense_parameters: int

    @property
    def flops(self) -> int:
        return 2 * self.tokens * self.macs_per_token

    @property
    def dense_flops(self) -> int:
        return 2 * self.tokens * self.dense_macs_per_token

    @property
    def relative_cost(self) -> float:
        return self.macs_per_token / self.dense_macs_per_token


@dataclass
class CostReport:
    """FLOPs of one forward pass, per structured layer and in total, vs the same model with dense layers."""

    layers: list[LayerCost] = field(default_factory=list)
    other_flops: int = 0  # everything outside the structured layers, measured by FlopCounterMode

    @property
    def structured_flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def structured_dense_flops(self) -> int:
        return sum(layer.dense_flops for layer in self.layers)

    @property
    def total_flops(self) -> int:
        return self.other_flops + self.structured_flops

    @property
    def dense_total_flops(self) -> int:
        return self.other_flops + self.structured_dense_flops

    @property
    def structured_fraction(self) -> float:
        """Cost of the structured layers relative to their dense versions (the budget's unit)."""
        dense = self.structured_dense_flops
        return self.structured_flops / dense if dense else 1.0

    @property
    def total_fraction(self) -> float:
        return self.total_flops / self.dense_total_flops if self.dense_total_flops else 1.0

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(layer) | {"relative_cost": layer.relative_cost} for layer in self.layers],
            "other_flops": self.other_flops,
            "structured_flops": self.structured_flops,
            "structured_dense_flops": self.structured_dense_flops,
            "structured_fraction": self.structured_fraction,
            "total_flops": self.total_flops,
            "dense_total_flops": self.dense_total_flops,
            "total_fraction": self.total_fraction,
        }

    def to_markdown(self) -> str:
        lines = [
            "| layer | kind | in | out | MACs/token | dense MACs/token | cost | params | dense params |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in self.layers:
            lines.append(
                f"| {c.name} | {c.kind} | {c.in_features} | {c.out_features} | {c.macs_per_token:,} | "
                f"{c.dense_macs_per_token:,} | {c.relative_cost:.3f} | {c.parameters:,} | {c.dense_parameters:,} |"
            )
        lines += [
            "",
            "| total | FLOPs | dense-model FLOPs | fraction |",
            "|---|---:|---:|---:|",
            f"| structured layers | {self.structured_flops:,} | {self.structured_dense_flops:,} | "
            f"{self.structured_fraction:.3f} |",
            f"| rest of the model (FlopCounterMode) | {self.other_flops:,} | {self.other_flops:,} | 1.000 |",
            f"| whole model | {self.total_flops:,} | {self.dense_total_flops:,} | {self.total_fraction:.3f} |",
        ]
        return "\n".join(lines)


class _TokenProbe(nn.Module):
    """Stands in for a structured layer during measurement: counts tokens, returns zeros, no FLOPs."""

    def __init__(self, layer: StructuredLinear) -> None:
        super().__init__()
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tokens += x.numel() // self.in_features
        return x.new_zeros(*x.shape[:-1], self.out_features)


@contextmanager
def _probes(model: nn.Module, names: list[str]):
    originals = {name: model.get_submodule(name) for name in names}
    probes = {name: _TokenProbe(layer) for name, layer in originals.items()}
    try:
        for name, probe in probes.items():
            model.set_submodule(name, probe)
        yield probes
    finally:
        for name, layer in originals.items():
            model.set_submodule(name, layer)


@torch.no_grad()
def cost_report(model: nn.Module, *inputs, **kwargs) -> CostReport:
    """Run ``model(*inputs, **kwargs)`` once and account its FLOPs.

    Structured layers (any :class:`StructuredLinear`) are counted by their effective cost; every other
    operation by ``FlopCounterMode``. The model itself cannot be a structured layer (wrap it).
    """
    names = [name for name, m in model.named_modules() if isinstance(m, StructuredLinear) and name]
    if isinstance(model, StructuredLinear):
        raise ValueError("cost_report needs a model that contains structured layers, not a structured layer itself")
    layers = {name: model.get_submodule(name) for name in names}
    with _probes(model, names) as probes:
        counter = FlopCounterMode(display=False)
        with counter:
            model(*inputs, **kwargs)
    report = CostReport(other_flops=int(counter.get_total_flops()))
    for name in names:
        layer = layers[name]
        dense_params = layer.in_features * layer.out_features + (
            layer.out_features if getattr(layer, "bias", None) is not None else 0
        )
        report.layers.append(
            LayerCost(
                name=name,
                kind=type(layer).__name__,
                in_features=layer.in_features,
                out_features=layer.out_features,
                tokens=probes[name].tokens,
                macs_per_token=layer.macs_per_token(),
                dense_macs_per_token=layer.dense_macs_per_token,
                parameters=layer.effective_parameters(),
                dense_parameters=dense_params,
            )
        )
    return report
