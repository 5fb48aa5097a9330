"""Compress a pretrained model to a cost target in one call: per-layer budgets (uniform or one global
budget allocated by :mod:`gblr.allocate`), then :func:`gblr.convert.convert_` with those budgets.

    result = compress_(model, family="gblr", budget=0.5, allocation="global")
    print(result.to_markdown())
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .allocate import (BUDGET_GRID, LayerAllocation, allocate_budgets, allocation_table, allocations_to_dicts,
                       error_curve, layer_sensitivities)
from .calibration import corrected_weight, input_grams, paired_moments
from .convert import (KEPT_DENSE, ConversionReport, ConvertConfig, convert_, default_filter, linear_weight,
                      select_layers)
from .fit import check_data_aware
from .replay import RollingReplay

__all__ = ["ALLOCATIONS", "CompressionResult", "compress_"]

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "global")
SENSITIVITY_FLOOR = 0.1  # of the median calibrated sensitivity: the least weight any layer gets


@dataclass
class CompressionResult:
    conversion: ConversionReport
    allocation: list[LayerAllocation] = field(default_factory=list)  # empty for a uniform allocation
    target: float = 0.0
    reached: float = 0.0  # summed MACs / summed dense MACs of the selected layers (kept-dense ones at 1)

    def to_dict(self) -> dict:
        return {"target": self.target, "reached": self.reached, "conversion": self.conversion.to_dict(),
                "allocation": allocations_to_dicts(self.allocation)}

    def to_markdown(self) -> str:
        text = [f"cost of the replaced layers: {self.reached:.4f} of dense (target {self.target:g})", "",
                self.conversion.to_markdown()]
        if self.allocation:
            text += ["", "global budget allocation:", "", allocation_table(self.allocation)]
        return "\n".join(text)


def compress_(
    model: nn.Module,
    family: str = "gblr",
    budget: float = 0.5,
    allocation: str = "uniform",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    calibration_loss: Callable[[nn.Module], float] | None = None,
    options: dict | None = None,
    calibration_inputs: Callable[[nn.Module], object] | None = None,
    sequential: bool = False,
    refit_kept: bool = False,
) -> CompressionResult:
    """Replace the selected linear layers of ``model`` (in place) by ``family`` fits whose summed cost
    is at most ``budget`` of the selected layers' dense cost.

    ``allocation="uniform"`` gives every layer ``budget``; ``"global"`` allocates per-layer budgets by
    error curves, weighted by each layer's measured effect on ``calibration_loss(model)`` when given; it
    may also leave a layer dense (its full cost, no error) where that buys more than compressing it. A
    dict ``{layer name: budget}`` gives those layers their budgets (1 keeps a layer dense; the others get
    ``budget``), e.g. another family's global allocation, so that two families differ only in their fit.
    ``calibration_inputs(model)``, when given, runs the model on calibration data: every fit then
    minimises the error of its layer's outputs on those inputs instead of the error of its weights (GBLR
    and low-rank; see :func:`gblr.calibration.input_grams`), and so do the error curves of the allocation.
    ``sequential=True`` (with ``calibration_inputs``) fits the layers one group at a time in the order the
    model calls them, each on the inputs it receives once the earlier layers are replaced, against the
    original layer's outputs on the original inputs: later layers make up for part of the earlier errors.
    It runs the calibration data through the original and the partly replaced model once per group of
    layers sharing an input (attention's q, k and v are one group); in a stack of blocks (a transformer's
    layers) each such run goes through only the group's block and the one before it
    (:class:`gblr.replay.RollingReplay`), so ``calibration_inputs`` must only call the model, not use
    what it returns (a shortened call returns None; where it is used, everything runs in full).
    ``refit_kept=True`` (sequential only) also gives every layer the allocation keeps dense its corrected
    weight, in its turn: it stays dense (same cost) and makes up for part of the errors before it on the
    calibration data (on SmolLM2-135M at 0.8 with 32x256 input tokens it raised held-out perplexity from
    90.9 to 93.7; hence off by default).
    Example::

        result = gblr.compress_(model, "gblr", budget=0.5, allocation="global")
        print(result.target, result.reached)       # asked and reached cost of the replaced layers
    """
    config = ConvertConfig(family=family, budget=budget, options=dict(options or {}))
    given = allocation if isinstance(allocation, dict) else None
    if given is None and allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS} or a dict of per-layer budgets, got {allocation!r}")
    if calibration_inputs is not None:  # before the model runs on any calibration data
        check_data_aware(family, "calibration_inputs")
    if not isinstance(sequential, bool):
        raise ValueError(f"sequential must be True or False, got {sequential!r}")
    if sequential and calibration_inputs is None:
        raise ValueError("sequential=True fits the layers' outputs: it needs calibration_inputs")
    if not isinstance(refit_kept, bool) or (refit_kept and not sequential):
        raise ValueError(f"refit_kept must be True or False and needs sequential=True, got {refit_kept!r}")
    budgets, allocations, grams, kept, groups = None, [], None, set(), []
    selected, _ = select_layers(model, filter_fn)
    if calibration_inputs is not None:
        linear = {name: module for name, module in selected.items() if linear_weight(module) is not None}
        grams = input_grams(model, linear, calibration_inputs, groups)
    if allocation == "global":
        convolutions = [name for name, module in selected.items() if linear_weight(module) is None]
        if convolutions:
            raise ValueError(f"allocation='global' covers linear layers only; {convolutions[0]!r} is a convolution "
                             "(leave convolutions out with filter_fn, or use allocation='uniform')")
        budgets, allocations = _global_budgets(model, selected, config, calibration_loss, grams)
        kept = {name for name, b in budgets.items() if b >= 1.0}
    elif given is not None:
        budgets = _given_budgets(given, selected, budget)
        kept = {name for name, b in budgets.items() if b >= 1.0}
    if calibration_loss is not None and allocation != "global":
        raise ValueError("calibration_loss is used only by allocation='global'")
    grams = grams and {name: gram for name, gram in grams.items() if name not in kept}
    convert_filter = (lambda module, name: name not in kept and (filter_fn or default_filter)(module, name))
    if sequential:
        report = _convert_sequentially(model, config, convert_filter, budgets, groups, calibration_inputs,
                                       kept if refit_kept else set())
    else:
        report = convert_(model, config, convert_filter, budgets, grams)
    report.skipped = [(name, KEPT_DENSE if name in kept else reason) for name, reason in report.skipped]
    kept_macs = sum(linear_weight(selected[name]).numel() for name in kept)
    dense = sum(r.in_features * r.out_features for r in report.replaced) + kept_macs
    structured = sum(r.reached_cost * r.in_features * r.out_features for r in report.replaced) + kept_macs
    target = budget if given is None else (
        sum(budgets[r.name] * r.in_features * r.out_features for r in report.replaced) + kept_macs) / max(dense, 1)
    return CompressionResult(report, allocations, target, structured / max(dense, 1))


def _convert_sequentially(model: nn.Module, config: ConvertConfig, filter_fn, budgets: dict | None,
                          groups: list[list[str]], run: Callable[[nn.Module], object], refit: set[str]
                          ) -> ConversionReport:
    """:func:`convert_` one group of layers at a time (``groups`` in call order), each fitted to the
    corrected weight under the moments of the inputs it now receives (see :mod:`gblr.calibration`); the
    report's errors are those of each fit against its corrected weight. The dense layers named in
    ``refit`` get their corrected weight in their turn and stay dense."""
    to_convert, skipped = select_layers(model, filter_fn)
    report = ConversionReport(skipped=skipped)
    convolutions = [name for name, module in to_convert.items() if linear_weight(module) is None]
    reference = copy.deepcopy(model)  # the original (in the same mode), for its inputs and weights
    ordered = [names for names in ([name for name in group if name in to_convert or name in refit] for group in groups)
               if names]
    # a group in block i needs only blocks i-1 (replayed) and i of both models, not the whole of them
    rolling = RollingReplay(reference, model, [name for group in ordered for name in group])
    for names in tqdm(ordered, desc="sequential fits", disable=None, leave=False):
        moments = rolling.measure(names, lambda names=names: paired_moments(reference, model, names, run))
        with torch.no_grad():
            for name in names:
                weight = linear_weight(model.get_submodule(name))
                original = linear_weight(reference.get_submodule(name))
                weight.copy_(corrected_weight(original, *moments[name]).to(weight.dtype))
        fitted = [name for name in names if name not in refit]
        if not fitted:
            continue
        part = convert_(model, config, lambda module, name, fitted=fitted: name in fitted, budgets,
                        {name: moments[name][1] for name in fitted})
        report.replaced += part.replaced
        report.skipped += part.failed
        with torch.no_grad():  # a layer that could not be converted stays as it was
            for name, _ in part.failed:
                linear_weight(model.get_submodule(name)).copy_(linear_weight(reference.get_submodule(name)))
    if convolutions:  # never called through a linear layer's hook: fitted to their weights, as without data
        part = convert_(model, config, lambda module, name: name in convolutions, budgets)
        report.replaced += part.replaced
        report.skipped += part.failed
    return report


def _given_budgets(given: dict, selected: dict[str, nn.Module], budget: float) -> dict[str, float]:
    """Every selected layer's budget: ``given``'s where it names one (checked), else ``budget``."""
    for name, value in given.items():
        if name not in selected:
            raise ValueError(f"allocation: {name!r} is not one of the layers to compress")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"allocation[{name!r}] must be a budget in (0, 1], got {value!r}")
        if value >= 1 and linear_weight(selected[name]) is None:
            raise ValueError(f"allocation[{name!r}]: only linear layers can be kept dense; leave convolutions out with filter_fn")
    return {name: float(given.get(name, budget)) for name in selected}


def _global_budgets(model, selected: dict[str, nn.Module], config: ConvertConfig, calibration_loss, grams):
    weights = {name: linear_weight(module).detach().cpu() for name, module in selected.items()}  # fits run on the CPU
    grams = grams or {}
    # one curve per layer over the grid and, last, the uniform budget (for the report)
    points = {name: error_curve(config.family, w, (*BUDGET_GRID, config.budget), grams.get(name), **config.options)
              for name, w in tqdm(weights.items(), desc="error curves", disable=None, leave=False)}
    curves = {name: errors[:-1] for name, errors in points.items()}
    uniform = {name: errors[-1] for name, errors in points.items()}
    macs = {name: w.numel() for name, w in weights.items()}
    sensitivity = {name: 1.0 for name in weights}
    if calibration_loss is not None:
        measured = layer_sensitivities(model, selected, calibration_loss, config.family, config.budget, grams,
                                       **config.options)
        # loss increase per unit of squared relative error, at the uniform budget
        sensitivity = {name: max(increase, 0.0) / max(error * error, 1e-12) for name, (increase, error) in measured.items()}
        positive = sorted(a for a in sensitivity.values() if a > 0)
        if not positive:
            raise ValueError("calibration: no layer increased the calibration loss; use more calibration data")
        # An increase at or below zero is below what the calibration data resolves at this budget, not a
        # sign that the layer is free: such a layer would be cut to the smallest budget. Floor each weight
        # at a fraction of the median measured one.
        floor = SENSITIVITY_FLOOR * positive[len(positive) // 2]
        sensitivity = {name: max(a, floor) for name, a in sensitivity.items()}
    # the last choice keeps a layer dense: its full cost and no error
    grid = (*BUDGET_GRID, 1.0)
    curves = {name: [*errors, 0.0] for name, errors in curves.items()}
    budgets = allocate_budgets(curves, macs, config.budget, grid, sensitivity)
    allocations = []
    for name, w in weights.items():
        index = grid.index(budgets[name])
        allocations.append(LayerAllocation(name, w.shape[1], w.shape[0], budgets[name], curves[name][index],
                                           sensitivity[name], uniform[name]))
    log.info("global allocation: %s", {n: b for n, b in budgets.items()})
    return budgets, allocations
