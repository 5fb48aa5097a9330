"""Structure learning for GBLR layers: optimizer groups, the proximal width step, a FLOPs budget
controller and the sigma schedule, driven by one object called once per optimizer step.

Cost model. The counted cost of a layer is ``sum_k min(r (h_k + w_k), h_k w_k)`` over active components
(:meth:`GBLRLinear.macs_per_token`). Shrinking the output width of a component by ``dw`` saves about
``r * out_features * dw`` MACs and the input width ``r * in_features * dw``, so the soft threshold on each
width is weighted by its side's cost: ``w <- clamp(w - threshold * r * side_length / scale, 0, 1)``.
That is the proximal step of the penalty ``lambda * (smooth FLOPs of all GBLR layers)``.

The controller targets FLOPs directly: each step it chooses the threshold (by bisection on the exact
counted cost, which is monotone in it) as the smallest one that brings the model to its current budget.
The budget ramps linearly from the starting cost to the target, then holds; while holding, a model that
drifts below the tolerance band is grown back (a negative threshold), so it ends within the band.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from .mask import interval_sizes, inverse_two_sigma_squared
from .structured.gblr import GBLRLinear

__all__ = [
    "STRUCTURE_GROUP",
    "gblr_layers",
    "param_groups",
    "structure_lr",
    "prox_width_step",
    "project_to_budget",
    "wrap_starts",
    "SigmaSchedule",
    "StructureLearner",
]

log = logging.getLogger(__name__)

#: Name of the optimizer param group holding widths and starts.
STRUCTURE_GROUP = "gblr_structure"


def gblr_layers(model: nn.Module) -> list[tuple[str, GBLRLinear]]:
    """All GBLR layers of ``model`` (the model itself included) with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GBLRLinear)]


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    structure_lr: float = 5e-3,
    structure_betas: tuple[float, float] = (0.0, 0.999),
) -> list[dict]:
    """Optimizer groups: matrices/factors with weight decay, vectors (biases, norms) without, and the
    GBLR widths/starts in their own group (no weight decay, no momentum by default, own learning rate).
    """
    for name, value in (("lr", lr), ("structure_lr", structure_lr), ("weight_decay", weight_decay)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    structural = {id(p) for _, layer in gblr_layers(model) for p in layer.structure_parameters()}
    decay, no_decay, structure = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in structural:
            structure.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "weights", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        {
            "name": STRUCTURE_GROUP,
            "params": structure,
            "lr": structure_lr,
            "weight_decay": 0.0,
            "betas": structure_betas,
        },
    ]
    return [g for g in groups if g["params"]]


def structure_lr(optimizer: torch.optim.Optimizer) -> float:
    """Current learning rate of the structural group (found by name, never 'the last group')."""
    for group in optimizer.param_groups:
        if group.get("name") == STRUCTURE_GROUP:
            return float(group["lr"])
    raise ValueError(
        f"optimizer has no param group named {STRUCTURE_GROUP!r}; build it with gblr.learn.param_groups(model, ...)"
    )


def _width_costs(layer: GBLRLinear) -> tuple[float, float]:
    """MACs per unit of normalised width on the output and the input side."""
    return float(layer.rank * layer.out_features), float(layer.rank * layer.in_features)


def _mean_width_cost(costs: list[tuple[float, float]]) -> float:
    """Mean of the side costs: thresholds are expressed relative to it."""
    return sum(c for pair in costs for c in pair) / (2 * len(costs))


@torch.no_grad()
def wrap_starts(layers: list[GBLRLinear]) -> None:
    for layer in layers:
        layer.out_starts.remainder_(1.0)
        layer.in_starts.remainder_(1.0)


@torch.no_grad()
def prox_width_step(layers: list[GBLRLinear], lam: float, lr: float) -> None:
    """Proximal step of ``lam * (smooth FLOPs / mean side cost)``: soft-threshold each width by
    ``lr * lam * side_cost / mean_side_cost``, clamp to [0, 1] and wrap the starts to [0, 1)."""
    if not layers:
        return
    costs = [_width_costs(layer) for layer in layers]
    mean_cost = _mean_width_cost(costs)
    for layer, (out_cost, in_cost) in zip(layers, costs):
        layer.out_widths.sub_(lr * lam * out_cost / mean_cost).clamp_(0.0, 1.0)
        layer.in_widths.sub_(lr * lam * in_cost / mean_cost).clamp_(0.0, 1.0)
    wrap_starts(layers)


class _CostModel:
    """Counted MACs of all GBLR layers as a function of a uniform cost-weighted threshold ``t``:
    ``cost(t) = sum over layers of macs(clamp(w - t * side_cost / mean_cost))``, non-increasing in t."""

    def __init__(self, layers: list[GBLRLinear]) -> None:
        out_w, in_w, out_len, in_len, out_c, in_c, ranks, tiles = [], [], [], [], [], [], [], []
        costs = [_width_costs(layer) for layer in layers]
        self.mean_cost = _mean_width_cost(costs)
        for layer, (oc, ic) in zip(layers, costs):
            k = layer.num_components
            out_w.append(layer.out_widths.detach().to("cpu", torch.float64))
            in_w.append(layer.in_widths.detach().to("cpu", torch.float64))
            out_len.append(torch.full((k,), float(layer.out_features), dtype=torch.float64))
            in_len.append(torch.full((k,), float(layer.in_features), dtype=torch.float64))
            out_c.append(torch.full((k,), oc / self.mean_cost, dtype=torch.float64))
            in_c.append(torch.full((k,), ic / self.mean_cost, dtype=torch.float64))
            ranks.append(torch.full((k,), float(layer.rank), dtype=torch.float64))
            tiles.append(torch.full((k,), float(layer.tile), dtype=torch.float64))
        self.out_w, self.in_w = torch.cat(out_w), torch.cat(in_w)
        self.out_len, self.in_len = torch.cat(out_len), torch.cat(in_len)
        self.out_c, self.in_c = torch.cat(out_c), torch.cat(in_c)
        self.rank = torch.cat(ranks)
        self.tile = torch.cat(tiles)
        # Candidate widths are rounded to the parameters' dtype, so the cost evaluated here is the cost
        # the layers will have once the threshold is applied.
        self.dtype = layers[0].out_widths.dtype
        self.active = (
            (self._sizes(self.out_w, self.out_len) > 0) & (self._sizes(self.in_w, self.in_len) > 0)
        ).to(torch.float64)
        # Beyond this threshold every width is 0; below its negative every width is 1.
        self.max_threshold = float(1.0 / torch.cat([self.out_c, self.in_c]).min())

    def _sizes(self, w: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return interval_sizes(w, length, self.tile).to(torch.float64)

    def thresholded(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """New (output, input) widths of all components, as stored in the parameters' dtype.

        A negative threshold grows only the active components: reviving every pruned component at once
        would make the cost jump past the budget.
        """
        out_c, in_c = self.out_c, self.in_c
        if threshold < 0:
            out_c, in_c = out_c * self.active, in_c * self.active
        out_w = (self.out_w - threshold * out_c).clamp(0.0, 1.0).to(self.dtype).to(torch.float64)
        in_w = (self.in_w - threshold * in_c).clamp(0.0, 1.0).to(self.dtype).to(torch.float64)
        return out_w, in_w

    def cost(self, threshold: float) -> float:
        out_w, in_w = self.thresholded(threshold)
        h = self._sizes(out_w, self.out_len)
        w = self._sizes(in_w, self.in_len)
        per = torch.minimum(self.rank * (h + w), h * w) * ((h > 0) & (w > 0))
        return float(per.sum())

    def threshold_for(self, budget: float, allow_growth: bool, iterations: int = 60) -> float:
        """Smallest threshold whose cost is within ``budget`` (non-negative unless growth is allowed)."""
        lo = -self.max_threshold if allow_growth else 0.0
        hi = self.max_threshold
        if self.cost(lo) <= budget:
            return lo
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if self.cost(mid) <= budget:
                hi = mid
            else:
                lo = mid
        return hi


@torch.no_grad()
def project_to_budget(layers: list[GBLRLinear], budget_macs: float, allow_growth: bool = False) -> float:
    """Soft-threshold all widths (cost-weighted) by the smallest amount that brings the layers' counted
    MACs per token within ``budget_macs``; with ``allow_growth`` a model under budget grows its active
    components up to it. Returns the threshold applied (negative for growth)."""
    cost_model = _CostModel(layers)
    threshold = cost_model.threshold_for(budget_macs, allow_growth)
    out_w, in_w = cost_model.thresholded(threshold)
    offset = 0
    for layer in layers:
        k = layer.num_components
        layer.out_widths.copy_(out_w[offset : offset + k])
        layer.in_widths.copy_(in_w[offset : offset + k])
        offset += k
    return threshold


@dataclass
class SigmaSchedule:
    """Gaudi sigma annealed linearly from ``start_sigma`` to ``end_sigma`` between two steps.

    ``end_sigma=None`` switches to the Dirichlet mask (no Gaussian) at ``end_step``.
    """

    start_sigma: float | None = 1.0
    end_sigma: float | None = 100.0
    start_step: int = 0
    end_step: int = 1

    def __post_init__(self) -> None:
        inverse_two_sigma_squared(self.start_sigma)
        inverse_two_sigma_squared(self.end_sigma)
        if self.end_step < self.start_step or self.start_step < 0:
            raise ValueError(
                f"sigma schedule steps must satisfy 0 <= start_step <= end_step, got {self.start_step}, {self.end_step}"
            )

    def __call__(self, step: int) -> float | None:
        if step >= self.end_step:
            return self.end_sigma
        if step <= self.start_step or self.start_sigma is None or self.end_sigma is None:
            return self.start_sigma
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        return self.start_sigma + frac * (self.end_sigma - self.start_sigma)


class StructureLearner:
    """Call :meth:`step` once after every ``optimizer.step()``: it sets sigma, applies the proximal width
    step with the threshold the budget controller chooses, clamps widths and wraps starts.

    Args:
        model: the model holding GBLR layers.
        optimizer: an optimizer built from :func:`param_groups` (its structural group's lr is ``eta``).
        target: target cost of the GBLR layers as a fraction of their dense cost, in (0, 1].
        total_steps: number of optimizer steps of the run.
        ramp: fractions of ``total_steps`` where the budget starts moving from the starting cost and
            where it reaches ``target``.
        tolerance: relative band below the target that the holding phase keeps the cost in.
        l1: optional extra proximal penalty ``lambda`` (applied only while above the budget).
        sigma: a :class:`SigmaSchedule`, or None to leave each layer's sigma as it is.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        target: float,
        total_steps: int,
        ramp: tuple[float, float] = (0.0, 0.5),
        tolerance: float = 0.01,
        l1: float = 0.0,
        sigma: SigmaSchedule | None = None,
    ) -> None:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not (0.0 < target <= 1.0):
            raise ValueError(f"target must be a fraction of the dense cost in (0, 1], got {target!r}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if len(ramp) != 2 or not (0.0 <= ramp[0] <= ramp[1] <= 1.0):
            raise ValueError(f"ramp must be two fractions 0 <= start <= end <= 1, got {ramp!r}")
        if not (0.0 <= tolerance < 1.0):
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
        if not (math.isfinite(l1) and l1 >= 0):
            raise ValueError(f"l1 must be a finite number >= 0, got {l1!r}")
        self.layers = [layer for _, layer in gblr_layers(model)]
        if not self.layers:
            raise ValueError("model has no GBLRLinear layers; convert some layers first")
        structure_lr(optimizer)  # fail now, not at the first step, if the group is missing
        self.optimizer = optimizer
        self.target = float(target)
        self.total_steps = total_steps
        self.ramp_steps = (round(ramp[0] * total_steps), round(ramp[1] * total_steps))
        self.tolerance = float(tolerance)
        self.l1 = float(l1)
        self.sigma_schedule = sigma
        self.dense_macs = sum(layer.dense_macs_per_token for layer in self.layers)
        self.step_count = 0
        self.start_fraction: float | None = None
        self.last_threshold = 0.0
        if sigma is not None:
            self._set_sigma(sigma(0))

    # --- state -----------------------------------------------------------------------------------
    def cost_macs(self) -> int:
        """Counted MACs per token of all GBLR layers."""
        return sum(layer.macs_per_token() for layer in self.layers)

    def cost_fraction(self) -> float:
        """Counted cost of all GBLR layers as a fraction of their dense cost."""
        return self.cost_macs() / self.dense_macs

    def budget_fraction(self, step: int | None = None) -> float:
        """The budget (fraction of dense cost) the controller enforces at ``step``."""
        step = self.step_count if step is None else step
        start = self.start_fraction if self.start_fraction is not None else self.cost_fraction()
        start = max(start, self.target)
        begin, end = self.ramp_steps
        if step <= begin:
            return start
        if step >= end:
            return self.target
        return start + (step - begin) / (end - begin) * (self.target - start)

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "start_fraction": self.start_fraction,
            "last_threshold": self.last_threshold,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.start_fraction = state["start_fraction"]
        self.last_threshold = float(state["last_threshold"])
        if self.sigma_schedule is not None:
            self._set_sigma(self.sigma_schedule(self.step_count))

    # --- the step --------------------------------------------------------------------------------
    def _set_sigma(self, sigma: float | None) -> None:
        for layer in self.layers:
            layer.sigma = sigma

    @torch.no_grad()
    def step(self) -> dict:
        """Apply sigma schedule, proximal step and budget control; returns what it did (for logging)."""
        if self.start_fraction is None:
            self.start_fraction = self.cost_fraction()
        self.step_count += 1
        eta = structure_lr(self.optimizer)
        budget = self.budget_fraction() * self.dense_macs

        if self.l1 > 0 and self.cost_macs() > budget:
            prox_width_step(self.layers, self.l1, eta)

        holding = self.step_count >= self.ramp_steps[1]
        threshold = 0.0
        # A shrink can overshoot below the band (a component losing its last row drops its whole cost);
        # while holding, a second pass grows the surviving components back up to the budget.
        for _ in range(2 if holding else 1):
            cost = self.cost_macs()
            if not (cost > budget or (holding and cost < (1.0 - self.tolerance) * budget)):
                break
            threshold += project_to_budget(self.layers, budget, allow_growth=holding)
        for layer in self.layers:  # the optimizer step may have left [0, 1]
            layer.out_widths.clamp_(0.0, 1.0)
            layer.in_widths.clamp_(0.0, 1.0)
        wrap_starts(self.layers)
        self.last_threshold = threshold

        sigma = None
        if self.sigma_schedule is not None:
            sigma = self.sigma_schedule(self.step_count)
            self._set_sigma(sigma)
        stats = {
            "cost_fraction": self.cost_fraction(),
            "budget_fraction": budget / self.dense_macs,
            "threshold": threshold,
            "lambda": threshold / eta if eta > 0 else float("nan"),
            "sigma": sigma if self.sigma_schedule is not None else self.layers[0].sigma,
        }
        log.debug("structure step %d: %s", self.step_count, stats)
        return stats
