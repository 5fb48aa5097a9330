"""One budget for a whole model: per-layer budgets chosen by how much each layer suffers from less.

Given the layers to compress and a total target (a fraction of their summed dense cost), every layer
gets an error curve ``e_l(b)`` (relative weight error of the family's fit at budget ``b``) and a
sensitivity ``a_l`` (1 by default; with calibration, the model's loss increase when that layer alone is
compressed, per unit of squared error). The allocation minimises ``sum_l a_l e_l(b_l)^2`` subject to
``sum_l b_l M_l <= target * sum_l M_l`` (``M_l``: dense MACs) over a grid of budgets, by a Lagrange
multiplier found by bisection and a greedy pass that spends what the multiplier left over.

Error curves are closed-form for GBLR (block-low-rank fits, from one SVD per tiling) and low-rank (the
singular values); other families are fitted at each grid budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .convert import linear_weight
from .calibration import whitening
from .replay import BlockReplay
from .fit import (DEFAULT_GRIDS, block_low_rank_error_curve, check_data_aware, output_error, relative_error,
                  structured_from_dense)
from .structured import FAMILIES, LowRankLinear
from .structured.base import check_budget

__all__ = ["BUDGET_GRID", "LayerAllocation", "error_curve", "layer_sensitivities", "allocate_budgets", "allocation_table"]

log = logging.getLogger(__name__)

BUDGET_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


@dataclass
class LayerAllocation:
    name: str
    in_features: int
    out_features: int
    budget: float
    relative_error: float  # of the family's fit at this budget, from the error curve
    sensitivity: float
    uniform_error: float  # at the uniform budget, for comparison


def error_curve(family: str, weight: torch.Tensor, budgets=BUDGET_GRID, gram: torch.Tensor | None = None,
                **options) -> list[float]:
    """Relative error ``||W_fit - W|| / ||W||`` of ``family``'s fit of ``weight`` at each budget;
    ``inf`` where the family cannot reach a budget for this shape. With ``gram`` (the inputs' second
    moment on calibration data), the relative error of the outputs of the data-aware fit."""
    if family not in FAMILIES:
        raise ValueError(f"unknown structured family {family!r}; known families: {', '.join(FAMILIES)}")
    weight = weight.detach()
    if gram is not None:
        check_data_aware(family)
    if family == "gblr":  # the block-low-rank candidates of fit_gblr: an upper bound of its error
        return block_low_rank_error_curve(weight, budgets, options.get("grids", DEFAULT_GRIDS), gram,
                                          options.get("damping", 0.01))
    if family == "lowrank":
        m, n = weight.shape
        whitened = weight.double() if gram is None else weight.double() @ whitening(gram, options.get("damping", 0.01))
        energy = torch.linalg.svdvals(whitened).pow(2)
        tail = energy.flip(0).cumsum(0).flip(0).tolist() + [0.0]  # tail[r] = energy beyond rank r
        total = max(tail[0], 1e-300)
        errors = []
        for budget in budgets:
            try:
                rank = LowRankLinear.size_for_budget(n, m, budget)["rank"]
            except ValueError:  # below rank 1
                errors.append(math.inf)
                continue
            errors.append(math.sqrt(tail[rank] / total))
        return errors
    errors = []
    for budget in budgets:
        try:
            layer = structured_from_dense(family, weight, budget, **options).eval()
        except ValueError:
            errors.append(math.inf)
            continue
        with torch.no_grad():
            errors.append(relative_error(layer.to_dense(), weight))
    return errors


def layer_sensitivities(
    model: nn.Module,
    layers: dict[str, nn.Module],
    loss_fn: Callable[[nn.Module], float],
    family: str,
    budget: float,
    grams: dict[str, torch.Tensor] | None = None,
    **options,
) -> dict[str, tuple[float, float]]:
    """Calibration: for each layer, the increase of ``loss_fn(model)`` when only that layer is replaced
    by its ``family`` fit at ``budget`` (fitted to its inputs' ``grams`` when given), with that fit's
    relative error (of the outputs, with grams): ``{name: (loss increase, error)}``. The model is
    restored after each measurement. Blocks before a measured layer's block replay their recorded outputs
    where that is exact (:class:`gblr.replay.BlockReplay`): the same numbers, the loss runs in 0.61x the
    time on SmolLM2-135M."""
    replay = BlockReplay(model, list(layers))
    base = replay.record(lambda: loss_fn(model))
    result = {}
    for name, module in tqdm(layers.items(), desc="sensitivities", disable=None, leave=False):
        weight = linear_weight(module).detach()
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        gram = (grams or {}).get(name)
        trial = structured_from_dense(family, weight, budget, bias, gram=gram, **options).eval()
        with torch.no_grad():
            error = relative_error(trial.to_dense(), weight) if gram is None else output_error(trial.to_dense(), weight, gram)
        model.set_submodule(name, trial)
        try:
            with replay.skipping_before(name):
                increase = loss_fn(model) - base
        finally:
            model.set_submodule(name, module)
        result[name] = (increase, error)
        log.info("sensitivity of %s: loss +%.5f at error %.4f", name, increase, error)
    return result


def allocate_budgets(
    curves: dict[str, list[float]],
    dense_macs: dict[str, int],
    target: float,
    budgets=BUDGET_GRID,
    sensitivity: dict[str, float] | None = None,
) -> dict[str, float]:
    """Per-layer budgets from ``budgets`` minimising ``sum a_l e_l(b_l)^2`` with the total cost at most
    ``target`` of the summed dense MACs. ``curves[name][i]`` is the error at ``budgets[i]``."""
    target = check_budget(target)
    names = list(curves)
    if not names:
        return {}
    for name in names:
        if len(curves[name]) != len(budgets):
            raise ValueError(f"error curve of {name!r} has {len(curves[name])} points, expected {len(budgets)}")
        if name not in dense_macs:
            raise ValueError(f"no dense cost given for layer {name!r}")
    weight_of = {name: max((sensitivity or {}).get(name, 1.0), 0.0) for name in names}
    total = sum(dense_macs[name] for name in names)
    allowed = target * total
    # loss[name][i] = a * e^2 (inf where unreachable); cost[name][i] = b * M
    loss = {n: [weight_of[n] * e * e if math.isfinite(e) else math.inf for e in curves[n]] for n in names}
    cost = {n: [b * dense_macs[n] for b in budgets] for n in names}
    cheapest = sum(min(c for c, l in zip(cost[n], loss[n]) if math.isfinite(l)) for n in names)
    if cheapest > allowed:
        raise ValueError(f"target {target:g} is below the smallest reachable total cost "
                         f"({cheapest / total:.3f} of dense) for the grid {budgets[0]:g}..{budgets[-1]:g}")

    def pick(multiplier: float) -> dict[str, int]:
        return {n: min(range(len(budgets)), key=lambda i: loss[n][i] + multiplier * cost[n][i] / total) for n in names}

    def spent(choice: dict[str, int]) -> float:
        return sum(cost[n][i] for n, i in choice.items())

    low, high = 0.0, 1.0
    while spent(pick(high)) > allowed:
        high *= 4
        if high > 1e12:
            break
    for _ in range(60):  # smallest multiplier within the budget
        middle = (low + high) / 2
        low, high = (middle, high) if spent(pick(middle)) > allowed else (low, middle)
    choice = pick(high)
    # Spend what is left: the upgrade with the largest loss decrease per extra MAC, while it fits.
    while True:
        left = allowed - spent(choice)
        best, best_rate = None, 0.0
        for n in names:
            for i in range(choice[n] + 1, len(budgets)):
                extra = cost[n][i] - cost[n][choice[n]]
                gain = loss[n][choice[n]] - loss[n][i]
                if extra <= left and gain > 0 and gain / extra > best_rate:
                    best, best_rate = (n, i), gain / extra
        if best is None:
            break
        choice[best[0]] = best[1]
    return {n: budgets[i] for n, i in choice.items()}


def allocation_table(allocations: list[LayerAllocation]) -> str:
    lines = ["| layer | in | out | budget | relative error | error at uniform budget | sensitivity |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for a in allocations:
        lines.append(f"| {a.name} | {a.in_features} | {a.out_features} | {a.budget:.2f} | {a.relative_error:.4f} | "
                     f"{a.uniform_error:.4f} | {a.sensitivity:.4g} |")
    return "\n".join(lines)


def allocations_to_dicts(allocations: list[LayerAllocation]) -> list[dict]:
    return [asdict(a) for a in allocations]
