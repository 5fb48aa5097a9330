"""Structure learning for GBLR layers: optimizer groups, the proximal width step, a FLOPs budget
controller and the sigma schedule, driven by one object called once per optimizer step.

Cost model. The counted cost of a layer is ``sum_k min(r (h_k + w_k), h_k w_k)`` over active components
(:meth:`GBLRLinear.macs_per_token`). Shrinking the output width of a component by ``dw`` saves about
``r * out_features * dw`` MACs and the input width ``r * in_features * dw``, so the soft threshold on each
width is weighted by its side's cost: ``w <- clamp(w - threshold * r * side_length / scale, 0, 1)``.
That is the proximal step of the penalty ``lambda * (smooth FLOPs of all GBLR layers)``.

The controller targets FLOPs directly: each step it chooses the threshold as the smallest one (on a
fine grid, searched in a few batched rounds on the device: no host round trip) whose exact counted
cost, monotone in the threshold, is within the model's current budget.
The budget ramps linearly from the starting cost to the target, then holds; while holding, a model that
drifts below the tolerance band is grown back (a negative threshold), so it ends within the band.

Two alternatives exist for comparison. ``controller="mean_width"`` is the original paper's rule: a fixed
threshold ``eta * lambda`` on every width (the same on both sides, not weighted by cost), applied while
the mean width is above the target times its starting value; the FLOPs it reaches are only observed.
``allocation="sensitivity"`` keeps the FLOPs controller but divides each layer's threshold by how much
the loss reacts to its widths (a running RMS of their gradients, relative to the other layers), so
layers the loss depends on give up less of their cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .mask import inverse_two_sigma_squared
from .shared_masks import SharedMasks
from .structured.base import check_features, check_nonnegative
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

#: Name of the optimizer param group holding widths and starts.
STRUCTURE_GROUP = "gblr_structure"
#: How the budget is shared between layers (:class:`StructureLearner`).
ALLOCATIONS = ("global", "per_layer", "sensitivity")
#: What the proximal step is steered by (:class:`StructureLearner`).
CONTROLLERS = ("flops", "mean_width")
#: Sensitivity allocation: the running RMS of width gradients forgets with this factor per step, and a
#: layer's threshold is scaled by at most this factor either way (a noisy gradient cannot zero a layer).
SENSITIVITY_MEMORY, SENSITIVITY_RANGE = 0.95, 4.0


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
        check_nonnegative(name, value)
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
        {"name": "weights", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
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


def _width_costs(layer: GBLRLinear, weight: float = 1.0) -> tuple[float, float]:
    """MACs per unit of normalised width on the output and the input side (times the layer's weight:
    its tokens per example)."""
    return float(weight * layer.rank * layer.out_features), float(weight * layer.rank * layer.in_features)


def _mean_width_cost(costs: list[tuple[float, float]]) -> float:
    """Mean of the side costs: thresholds are expressed relative to it."""
    return sum(c for pair in costs for c in pair) / (2 * len(costs))


@torch.no_grad()
def wrap_starts(layers: list[GBLRLinear]) -> None:
    """Starts to [0, 1) for all layers at once (one concatenation, one remainder, one batched copy)."""
    starts = [layer.out_starts for layer in layers] + [layer.in_starts for layer in layers]
    wrapped = torch.cat(starts).remainder_(1.0)
    torch._foreach_copy_(starts, list(wrapped.split([len(s) for s in starts])))


@torch.no_grad()
def prox_width_step(layers: list[GBLRLinear], lam: float, lr: float) -> None:
    """Proximal step of ``lam * (smooth FLOPs / mean side cost)``: soft-threshold each width by
    ``lr * lam * side_cost / mean_side_cost``, clamp to [0, 1] and wrap the starts to [0, 1)."""
    if not layers:
        return
    flat = _FlatWidths(layers)
    flat.write((flat.read() - lr * lam * flat.coefficient).clamp(0.0, 1.0))
    wrap_starts(layers)


class _FlatWidths:
    """All widths of a list of GBLR layers as one flat vector on their device (output sides, then input
    sides), with what the budget controller needs per entry. The cost of candidate widths and the
    threshold search are tensor operations with no host round trip, so a step never waits on the device.

    Threshold ``t`` moves every width to ``clamp(w - t * side_cost / mean_cost, 0, 1)``; a negative ``t``
    grows only components that are active (reviving every pruned one at once would overshoot)."""

    def __init__(self, layers: list[GBLRLinear], weights: list[float] | None = None, scale_range: float = 1.0) -> None:
        self.layers = layers
        self.widths = [layer.out_widths for layer in layers] + [layer.in_widths for layer in layers]
        self.lengths = [len(w) for w in self.widths]
        self.components = sum(self.lengths) // 2
        weights_or_ones = weights or [1.0] * len(layers)
        costs = [_width_costs(layer, weight) for layer, weight in zip(layers, weights_or_ones)]
        self.dense_macs = sum(w * layer.dense_macs_per_token for w, layer in zip(weights_or_ones, layers))
        mean_cost = _mean_width_cost(costs)
        sides = [(cost[0], layer.out_features, layer) for layer, cost in zip(layers, costs)]
        sides += [(cost[1], layer.in_features, layer) for layer, cost in zip(layers, costs)]
        device, dtype = self.widths[0].device, self.widths[0].dtype

        def per_entry(values, dtype):
            return torch.cat([torch.full((layer.num_components,), v, dtype=dtype) for v, (_, _, layer) in zip(values, sides)]).to(device)

        self.dtype = dtype
        self.coefficient = per_entry([c / mean_cost for c, _, _ in sides], dtype)
        # Which layer each entry belongs to (for per-layer sums), and how many entries each layer has.
        self.layer_index = per_entry([float(i % len(layers)) for i in range(len(sides))], torch.float64).long()
        self.entries_per_layer = torch.tensor([2.0 * layer.num_components for layer in layers], dtype=dtype, device=device)
        self.coefficient_per_layer = torch.zeros_like(self.entries_per_layer).index_add_(0, self.layer_index, self.coefficient)
        self.tiles_per_width = per_entry([n / layer.tile for _, n, layer in sides], torch.float64)
        self.tile = per_entry([float(layer.tile) for _, _, layer in sides], torch.float64)
        self.length = per_entry([float(n) for _, n, _ in sides], torch.float64)
        self.rank = per_entry([float(layer.rank) for _, _, layer in sides[: len(layers)]], torch.float64)
        # Per-component weight of the cost (None when all layers count alike: no extra operation).
        self.weight = None if weights is None else per_entry(weights, torch.float64)
        # Beyond this threshold every width is 0 (coefficients scaled down by at most ``scale_range``);
        # below its negative every width is 1.
        self.max_threshold = float(scale_range / self.coefficient.min())
        # Operations the cost can skip: tile multiples when every tile is 1, the cap at the length
        # when every tile divides its length (a width <= 1 then rounds to at most the length).
        self.all_tiles_one = all(layer.tile == 1 for layer in layers)
        self.tiles_divide = all(n % layer.tile == 0 for _, n, layer in sides)
        self._constants: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def read(self) -> torch.Tensor:
        return torch.cat(self.widths)

    @torch.no_grad()
    def write(self, widths: torch.Tensor) -> None:
        torch._foreach_copy_(self.widths, list(widths.split(self.lengths)))

    def cost(self, widths: torch.Tensor) -> torch.Tensor:
        """Counted MACs per token (float64) of flat widths ``(..., entries)``, as
        :meth:`GBLRLinear.macs_per_token` counts them (a component with an empty side costs 0)."""
        tiles = widths.to(torch.float64) * self.tiles_per_width
        rounded = tiles.round() if self.all_tiles_one else tiles.round() * self.tile
        sizes = torch.where(tiles >= 1.0, rounded, 0.0)
        if not self.tiles_divide:
            sizes = sizes.minimum(self.length)
        h, w = sizes[..., : self.components], sizes[..., self.components :]
        cost = torch.minimum(self.rank * (h + w), h * w)
        return (cost if self.weight is None else cost * self.weight).sum(-1)

    def active(self, widths: torch.Tensor) -> torch.Tensor:
        """1 for the entries whose component has both sides non-empty, else 0 (in the widths' dtype)."""
        nonempty = (widths.to(torch.float64) * self.tiles_per_width >= 1.0).view(2, -1).all(0)
        return nonempty.repeat(2).to(widths.dtype)

    def _constant(self, key: tuple, values: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``values()`` (float64, on the CPU) moved once to the widths' device and dtype, then reused."""
        if key not in self._constants:
            self._constants[key] = values().to(self.coefficient.device, self.dtype)
        return self._constants[key]

    def _first_candidates(self, allow_growth: bool, octaves: int) -> torch.Tensor:
        """Thresholds spaced by factors of sqrt(2) over ``octaves`` octaves below ``max_threshold``,
        0, and with growth their negatives."""

        def values() -> torch.Tensor:
            exponents = torch.arange(2 * octaves - 1, -1, -1, dtype=torch.float64) / 2
            magnitudes = self.max_threshold * 2.0**-exponents
            zero = torch.zeros(1, dtype=torch.float64)
            return torch.cat([-magnitudes.flip(0), zero, magnitudes] if allow_growth else [zero, magnitudes])

        return self._constant(("first", allow_growth, octaves), values)

    def _fractions(self, points: int) -> torch.Tensor:
        return self._constant(("fractions", points), lambda: torch.arange(1, points + 1, dtype=torch.float64) / points)

    def search(self, widths: torch.Tensor, budget: float, allow_growth: bool, octaves: int = 12,
               points: int = 32, coefficient: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Smallest threshold (to a fine grid) whose cost is within ``budget``, in two batched rounds:
        thresholds spaced by factors of sqrt(2) over ``octaves`` octaves below ``max_threshold`` on both
        sides of 0 (one side without growth), then ``points`` evenly spaced ones inside the bracket
        found (a step of at most 1.3 % of the threshold, or 2^-octaves / points of the largest one).
        ``coefficient``: per-entry threshold weights other than the cost weights (``self.coefficient``).
        Returns tensors on the device: the threshold, the new widths and their cost, and the widths
        and cost at threshold 0 (``widths`` clamped to [0, 1])."""
        candidates = self._first_candidates(allow_growth, octaves)
        zero = octaves * 2 if allow_growth else 0
        coefficient = self.coefficient if coefficient is None else coefficient
        if allow_growth:
            coefficient = torch.where(candidates.unsqueeze(-1) < 0, coefficient * self.active(widths), coefficient)
        for round_ in range(2):
            trial = (widths - candidates.unsqueeze(-1) * coefficient).clamp(0.0, 1.0)
            costs = self.cost(trial)
            # Costs fall as the threshold grows: take the first candidate within budget (with tensor
            # indices: no host read).
            first = (costs > budget).sum(0, keepdim=True).clamp(max=len(candidates) - 1)
            chosen = candidates.index_select(0, first)
            if round_ == 0:
                unchanged, unchanged_cost = trial[zero], costs[zero]
                before = (first - 1).clamp(min=0)
                below = candidates.index_select(0, before)
                candidates = below + (chosen - below) * self._fractions(points)
                if allow_growth:  # the bracket lies on one side of 0 (the threshold 0 changes nothing)
                    coefficient = coefficient.index_select(0, before)
        new_widths, new_cost = trial.index_select(0, first)[0], costs.index_select(0, first)[0]
        return chosen[0], new_widths, new_cost, unchanged, unchanged_cost


@torch.no_grad()
def project_to_budget(layers: list[GBLRLinear], budget_macs: float, allow_growth: bool = False) -> float:
    """Soft-threshold all widths (cost-weighted) by the smallest amount that brings the layers' counted
    MACs per token within ``budget_macs``; with ``allow_growth`` a model under budget grows its active
    components up to it. Returns the threshold applied (negative for growth)."""
    flat = _FlatWidths(layers)
    threshold, widths, *_ = flat.search(flat.read(), budget_macs, allow_growth)
    flat.write(widths)
    return float(threshold)


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
        l1: proximal penalty ``lambda``: with the FLOPs controller an optional extra shrink applied only
            while above the budget; with ``controller="mean_width"`` the fixed threshold itself (> 0).
        sigma: a :class:`SigmaSchedule`, or None to leave each layer's sigma as it is.
        allocation: "global": one cost-weighted threshold for all layers, so the budget holds for their
            sum and the layers share it as the loss and the penalty decide; "per_layer": every layer is held
            to the budget on its own (the allocation fixed-size families get); "sensitivity": one threshold,
            each layer's divided by the running RMS of its width gradients relative to the other layers'
            (clamped to a factor of 4 either way).
        controller: "flops": the threshold is searched each step so that the counted FLOPs meet the budget
            (above); "mean_width": the original paper's rule, a fixed threshold ``eta * l1`` on every width
            while the mean width exceeds ``target`` times its starting value (FLOPs are only observed).
        tokens: tokens per example of each GBLR layer, by qualified name (e.g. the output pixels of a
            structured convolution's layers), so that the budget is a fraction of the FLOPs per example
            when layers see different numbers of tokens; None: every layer counts alike.
        share_masks: compute the training masks and weights of all GBLR layers of ``model`` in a few
            batched calls per forward pass of ``model`` (:func:`gblr.shared_masks.share_masks`; same
            values and gradients, far fewer operations). ``learner.shared_masks.remove()`` undoes it.
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
        tokens: dict[str, float] | None = None,
        share_masks: bool = True,
        allocation: str = "global",
        controller: str = "flops",
    ) -> None:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not (0.0 < target <= 1.0):
            raise ValueError(f"target must be a fraction of the dense cost in (0, 1], got {target!r}")
        check_features("total_steps", total_steps)
        if len(ramp) != 2 or not (0.0 <= ramp[0] <= ramp[1] <= 1.0):
            raise ValueError(f"ramp must be two fractions 0 <= start <= end <= 1, got {ramp!r}")
        if not (0.0 <= tolerance < 1.0):
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
        check_nonnegative("l1", l1)
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {CONTROLLERS}, got {controller!r}")
        if controller == "mean_width" and (l1 <= 0 or allocation != "global"):
            raise ValueError(f"controller 'mean_width' needs l1 > 0 and allocation 'global', got l1={l1!r}, "
                             f"allocation={allocation!r}")
        self.allocation, self.controller = allocation, controller
        named = gblr_layers(model)
        self.layers = [layer for _, layer in named]
        if not self.layers:
            raise ValueError("model has no GBLRLinear layers; convert some layers first")
        self.weights = None
        if tokens is not None:
            missing = [name for name, _ in named if not (tokens.get(name, 0) > 0)]
            if missing:
                raise ValueError(f"tokens must give a number > 0 for every GBLR layer; missing or not positive: {missing[:3]}")
            counts = [float(tokens[name]) for name, _ in named]
            if len(set(counts)) > 1:  # equal counts change nothing: left out
                self.weights = [c / max(counts) for c in counts]
        structure_lr(optimizer)  # fail now, not at the first step, if the group is missing
        self.optimizer = optimizer
        self.target = float(target)
        self.total_steps = total_steps
        self.ramp_steps = (round(ramp[0] * total_steps), round(ramp[1] * total_steps))
        self.tolerance = float(tolerance)
        self.l1 = float(l1)
        self.sigma_schedule = sigma
        self.dense_macs = sum(w * layer.dense_macs_per_token for w, layer in zip(self._weights(), self.layers))
        self.step_count = 0
        self.start_fraction: float | None = None
        self.start_mean_width: float | None = None  # mean_width controller: the widths' mean at the first step
        self.last_threshold: float | torch.Tensor = 0.0
        self._gradient_power: torch.Tensor | None = None  # sensitivity allocation: running mean square per layer
        self._decay: float | None = None  # the 1/(2 sigma^2) last set on every layer
        self._flats: list[_FlatWidths] | None = None
        self.shared_masks = SharedMasks(model) if share_masks else None
        if sigma is not None:
            self._set_sigma(sigma(0))

    # --- state -----------------------------------------------------------------------------------
    def _weights(self) -> list[float]:
        return self.weights or [1.0] * len(self.layers)

    def cost_macs(self) -> float:
        """Counted MACs per token of all GBLR layers (weighted by their tokens when given)."""
        return sum(w * layer.macs_per_token() for w, layer in zip(self._weights(), self.layers))

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
            "start_mean_width": self.start_mean_width,
            "last_threshold": float(self.last_threshold),
            "gradient_power": None if self._gradient_power is None else self._gradient_power.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.start_fraction = state["start_fraction"]
        self.last_threshold = float(state["last_threshold"])
        self.start_mean_width = state.get("start_mean_width")  # absent in checkpoints of older versions
        power = state.get("gradient_power")
        widths = self.layers[0].out_widths
        self._gradient_power = None if power is None else torch.tensor(power, dtype=widths.dtype, device=widths.device)
        self._decay = None
        if self.sigma_schedule is not None:
            self._set_sigma(self.sigma_schedule(self.step_count))

    # --- the step --------------------------------------------------------------------------------
    def _set_sigma(self, sigma: float | None) -> None:
        decay = inverse_two_sigma_squared(sigma)
        if decay == self._decay:
            return
        # Two batched in-place operations instead of one fill per layer; no host-to-device copy.
        decays = [layer.sigma_decay for layer in self.layers]
        torch._foreach_zero_(decays)
        torch._foreach_add_(decays, decay)
        self._decay = decay

    def _flat_widths(self) -> list[_FlatWidths]:
        """The groups of layers the budget is held for: all layers, or each layer on its own."""
        widths = self.layers[0].out_widths
        if self._flats is None or self._flats[0].widths[0].device != widths.device or self._flats[0].dtype != widths.dtype:
            # built once per device (the model may move)
            if self.allocation != "per_layer":
                scale_range = SENSITIVITY_RANGE if self.allocation == "sensitivity" else 1.0
                self._flats = [_FlatWidths(self.layers, self.weights, scale_range)]
            else:
                self._flats = [_FlatWidths([layer], None if self.weights is None else [weight])
                               for layer, weight in zip(self.layers, self._weights())]
        return self._flats

    def _mean_width_step(self, flat: _FlatWidths, widths: torch.Tensor, eta: float) -> tuple[torch.Tensor, ...]:
        """The paper's rule: every width minus ``eta * l1`` while the mean width is above its target."""
        if self.start_mean_width is None:
            self.start_mean_width = float(widths.mean())  # one host read, at the first step only
        above = widths.mean() > self.target * self.start_mean_width
        threshold = above.to(widths.dtype) * (eta * self.l1)
        widths = (widths - threshold).clamp(0.0, 1.0)
        return threshold, widths, flat.cost(widths)

    def _sensitivity_coefficient(self, flat: _FlatWidths) -> torch.Tensor:
        """Cost weights divided by each layer's gradient RMS relative to the cost-weighted mean over
        layers (device operations only). Widths without a gradient yet count as zero gradient."""
        gradients = torch.cat([w.grad if w.grad is not None else torch.zeros_like(w) for w in flat.widths])
        per_layer = torch.zeros_like(flat.entries_per_layer).index_add_(0, flat.layer_index, gradients.square())
        power = per_layer / flat.entries_per_layer
        if self._gradient_power is None:
            self._gradient_power = power
        else:
            self._gradient_power = self._gradient_power * SENSITIVITY_MEMORY + power * (1.0 - SENSITIVITY_MEMORY)
        rms = self._gradient_power.sqrt()
        layer_cost = flat.coefficient_per_layer
        mean_rms = (rms * layer_cost).sum() / layer_cost.sum()
        # A layer whose gradients are larger than the others' is more sensitive: a smaller threshold.
        relative = (mean_rms / rms.clamp(min=1e-30)).clamp(1.0 / SENSITIVITY_RANGE, SENSITIVITY_RANGE)
        relative = torch.where(mean_rms > 0, relative, torch.ones_like(relative))  # no gradients yet: cost only
        return flat.coefficient * relative.index_select(0, flat.layer_index)

    @torch.no_grad()
    def step(self) -> dict:
        """Apply sigma schedule, proximal step and budget control. Returns what it did, for logging: the
        cost and threshold as tensors on the model's device (reading them waits for the device)."""
        if self.start_fraction is None:
            self.start_fraction = self.cost_fraction()  # one host read, at the first step only
        self.step_count += 1
        eta = structure_lr(self.optimizer)
        fraction = self.budget_fraction()
        holding = self.step_count >= self.ramp_steps[1]
        costs, thresholds = [], []
        for flat in self._flat_widths():
            budget = fraction * flat.dense_macs
            widths = flat.read()
            if self.controller == "mean_width":
                threshold, widths, cost = self._mean_width_step(flat, widths, eta)
                flat.write(widths)
                costs.append(cost)
                thresholds.append(threshold)
                continue
            if self.l1 > 0:  # the paper's L1 proximal step, while above the budget
                shrunk = (widths - eta * self.l1 * flat.coefficient).clamp(0.0, 1.0)
                widths = torch.where(flat.cost(widths) > budget, shrunk, widths)
            coefficient = self._sensitivity_coefficient(flat) if self.allocation == "sensitivity" else None
            threshold = widths.new_zeros(())
            # A shrink can overshoot below the band (a component losing its last row drops its whole cost);
            # while holding, a second pass grows the surviving components back up to the budget.
            for _ in range(2 if holding else 1):
                t, new_widths, new_cost, unchanged, cost = flat.search(widths, budget, allow_growth=holding,
                                                                       coefficient=coefficient)
                if holding:  # a group inside its band is left alone
                    in_band = (cost <= budget) & (cost >= (1.0 - self.tolerance) * budget)
                    t = t * ~in_band
                    new_widths = torch.where(in_band, unchanged, new_widths)
                    new_cost = torch.where(in_band, cost, new_cost)
                threshold, widths, cost = threshold + t, new_widths, new_cost
            flat.write(widths)
            costs.append(cost)
            thresholds.append(threshold)
        wrap_starts(self.layers)
        cost, threshold = (costs[0], thresholds[0]) if len(costs) == 1 else (torch.stack(costs).sum(), torch.stack(thresholds).mean())
        self.last_threshold = threshold
        budget = fraction * self.dense_macs

        sigma = None
        if self.sigma_schedule is not None:
            sigma = self.sigma_schedule(self.step_count)
            self._set_sigma(sigma)
        stats = {
            "cost_fraction": cost / self.dense_macs,
            "budget_fraction": budget / self.dense_macs,
            "threshold": threshold,
            "lambda": threshold / eta if eta > 0 else float("nan"),
            "sigma": sigma,  # None without a schedule (reading a layer's sigma would wait for the device)
        }
        return stats
