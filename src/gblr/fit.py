"""Fitting a GBLR layer to a pretrained dense matrix under a budget.

Two kinds of candidates, the best one wins:

- adaptive block-low-rank fits: tile the matrix, take every tile's rank-1 SVD pieces, and keep those
  with the most energy per MAC until the budget is spent (one grid is the whole matrix: the optimal
  low-rank matrix, so the result is never worse than low-rank, which GBLR contains);
- the learned fit the paper describes: all rank-1 SVD components, each starting on the shortest intervals
  that hold most of its singular vectors' energy (the paper starts from full widths and random starts, which
  cannot find blocks), then Adam on ``||W_hat - W||_F^2 / ||W||_F^2`` with exact masks while the structure
  learner shrinks the widths to the budget.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from .learn import StructureLearner, param_groups
from .mask import shortest_cyclic_windows
from .step import training_step
from .structured import StructuredLinear, family_class
from .structured.base import check_budget, check_weight
from .structured.gblr import GBLRLinear

__all__ = ["structured_from_dense", "fit_gblr", "learned_fit", "block_low_rank_fit", "block_low_rank_error_curve",
           "relative_error"]

log = logging.getLogger(__name__)

DEFAULT_GRIDS = (1, 2, 4, 8, 16)


def relative_error(approx: torch.Tensor, weight: torch.Tensor) -> float:
    weight = weight.detach().double()
    return float((approx.detach().double() - weight).norm() / weight.norm().clamp_min(1e-300))


def _splits(length: int, parts: int) -> list[tuple[int, int]]:
    """(start, size) of ``parts`` nearly equal consecutive pieces of ``range(length)``."""
    edges = [round(i * length / parts) for i in range(parts + 1)]
    return [(a, b - a) for a, b in zip(edges, edges[1:])]


class _TilePieces:
    """Every rank-1 SVD piece of every tile of a ``grid x grid`` tiling, sorted by energy per MAC.

    Tiles of equal shape are decomposed in one batched SVD. Pieces of one tile are orthogonal and tiles
    are disjoint, so the squared error of any chosen set is the total energy minus the chosen energies:
    error curves over many budgets cost no further SVDs.
    """

    def __init__(self, weight: torch.Tensor, grid: int) -> None:
        m, n = weight.shape
        grid = max(1, min(grid, m, n))
        target = weight.detach().double()
        self.shape, self.total = (m, n), float(target.pow(2).sum())
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for row_start, h in _splits(m, grid):
            for col_start, w in _splits(n, grid):
                by_shape.setdefault((h, w), []).append((row_start, col_start))
        self.groups = []  # per tile shape: (h, w, tile origins, U*S, Vh)
        energy, cost, where = [], [], []
        for (h, w), origins in by_shape.items():
            tiles = torch.stack([target[r : r + h, c : c + w] for r, c in origins])
            u, s, vh = torch.linalg.svd(tiles, full_matrices=False)
            self.groups.append((h, w, origins, u * s.unsqueeze(1), vh))
            g = len(self.groups) - 1
            energy.append(s.pow(2).flatten())
            cost.append(torch.full((s.numel(),), float(h + w), dtype=torch.float64))
            tile, rank = torch.meshgrid(torch.arange(len(origins)), torch.arange(s.shape[1]), indexing="ij")
            where.append(torch.stack([torch.full_like(tile.flatten(), g), tile.flatten(), rank.flatten()], 1))
        energy, cost, where = torch.cat(energy), torch.cat(cost), torch.cat(where)
        order = torch.argsort(energy / cost, descending=True, stable=True)
        self.energy, self.cost, self.where = energy[order].numpy(), cost[order].numpy(), where[order]

    def choose(self, budget: float) -> np.ndarray:
        """Indices of the greedy choice: the best pieces by energy per MAC, skipping those that do not
        fit any more, until ``budget * m * n`` MACs are spent."""
        allowed = budget * self.shape[0] * self.shape[1]
        cumulative = np.cumsum(self.cost)
        taken = int(np.searchsorted(cumulative, allowed, side="right"))
        chosen, spent = list(range(taken)), float(cumulative[taken - 1]) if taken else 0.0
        smallest = float(self.cost.min())
        position = taken
        while position < len(self.cost) and allowed - spent >= smallest:
            fits = np.nonzero(self.cost[position:] <= allowed - spent)[0]
            if not len(fits):
                break
            position += int(fits[0])
            chosen.append(position)
            spent += float(self.cost[position])
            position += 1
        return np.asarray(chosen, dtype=np.int64)

    def relative_error(self, budget: float) -> float:
        kept = float(self.energy[self.choose(budget)].sum())
        return math.sqrt(max(self.total - kept, 0.0) / self.total) if self.total > 0 else 0.0

    def layer(self, budget: float, dtype: torch.dtype, bias: torch.Tensor | None = None) -> GBLRLinear:
        chosen = self.choose(budget)
        if not len(chosen):
            m, n = self.shape
            raise ValueError(f"budget {budget:g} is below the cost of one rank-1 piece of a {m}x{n} matrix")
        m, n = self.shape
        out_factors = torch.zeros(len(chosen), 1, m, dtype=torch.float64)
        in_factors = torch.zeros(len(chosen), 1, n, dtype=torch.float64)
        out_intervals, in_intervals = [], []
        for i, (g, tile, rank) in enumerate(self.where[torch.from_numpy(chosen)].tolist()):
            h, w, origins, us, vh = self.groups[g]
            r0, c0 = origins[tile]
            out_factors[i, 0, r0 : r0 + h] = us[tile, :, rank]
            in_factors[i, 0, c0 : c0 + w] = vh[tile, rank]
            out_intervals.append((r0, h))
            in_intervals.append((c0, w))
        return GBLRLinear.from_intervals(out_intervals, in_intervals, out_factors.to(dtype), in_factors.to(dtype), bias)


def block_low_rank_fit(weight: torch.Tensor, budget: float, grid: int, bias=None) -> GBLRLinear:
    """Best rank-1 pieces of a ``grid x grid`` tiling, chosen greedily by energy per MAC.

    Every tile's SVD gives rank-1 pieces of energy ``s_k^2`` and cost ``h + w``; taking the pieces with
    the most energy per MAC until the budget is spent gives a block-low-rank matrix with a rank per tile
    adapted to the matrix (a GBLR special case). ``grid=1`` is the optimal low-rank matrix.
    """
    return _TilePieces(weight, grid).layer(budget, weight.dtype, bias)


def block_low_rank_error_curve(weight: torch.Tensor, budgets, grids: tuple[int, ...] = DEFAULT_GRIDS) -> list[float]:
    """Relative error of the best block-low-rank fit over ``grids`` at each budget (an upper bound of
    :func:`fit_gblr`'s error), from one batched SVD per tiling."""
    tilings = [_TilePieces(weight, grid) for grid in grids]
    return [min(t.relative_error(b) for t in tilings) for b in budgets]


def learned_fit(
    weight: torch.Tensor,
    budget: float,
    bias: torch.Tensor | None = None,
    steps: int = 200,
    lr: float = 5e-3,
    structure_lr: float = 0.0,
    keep: float = 0.99,
) -> GBLRLinear:
    """The paper's learned fit: the leading rank-1 SVD components (intervals from their energy), Adam on the relative
    error while the structure learner shrinks the widths to the budget."""
    m, n = weight.shape
    # Components beyond twice the rank a low-rank matrix affords are shrunk away anyway; not
    # starting them makes every step cheaper.
    components = min(m, n, max(1, math.ceil(2 * budget * m * n / (m + n))))
    layer = GBLRLinear.from_dense(weight.detach(), bias=bias, num_components=components)
    with torch.no_grad():
        for factors, starts, widths in (
            (layer.out_factors, layer.out_starts, layer.out_widths),
            (layer.in_factors, layer.in_starts, layer.in_widths),
        ):
            start, size = shortest_cyclic_windows(factors[:, 0].double().pow(2), keep)
            length = factors.shape[-1]
            starts.copy_(start / length)
            widths.copy_(size / length)
    # Default 0: the intervals stay where the energy put them and only the budget controller shrinks
    # them. Gradient steps on widths/starts (the paper: 20/min(m, n)) made the fit of a block-diagonal
    # matrix worse here (relative error 0.005 without, 0.05 to 0.3 with lr 0.002 to 0.03).
    optimizer = torch.optim.Adam(param_groups(layer, lr=lr, weight_decay=0.0, structure_lr=structure_lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.01, 1.0 - s / steps))
    learner = StructureLearner(layer, optimizer, target=budget, total_steps=steps, ramp=(0.0, 0.5), share_masks=False)
    target = weight.detach()
    scale = target.double().pow(2).sum().to(target.dtype)
    for _ in range(steps):
        training_step(lambda: (layer.effective_weight(hard=False) - target).pow(2).sum() / scale,
                      optimizer, schedule, learner)
    layer.eval()
    return layer


def fit_gblr(
    weight: torch.Tensor,
    budget: float,
    bias: torch.Tensor | None = None,
    grids: tuple[int, ...] = DEFAULT_GRIDS,
    **learned_options,
) -> GBLRLinear:
    """The best of: adaptive block-low-rank fits on several tilings (``grid=1`` is the optimal low-rank
    matrix, so the result is never worse than low-rank) and the learned fit (:func:`learned_fit`,
    skipped with ``steps=0``). Candidates over the budget are discarded."""
    check_weight(weight)
    steps = learned_options.get("steps", 200)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    target = weight.detach()
    tilings = [_TilePieces(target, grid) for grid in grids]
    errors = [tiling.relative_error(budget) for tiling in tilings]
    choice = min(range(len(tilings)), key=errors.__getitem__)
    best, error = tilings[choice].layer(budget, target.dtype, bias), errors[choice]
    best.fit_method = f"block-low-rank {grids[choice]}x{grids[choice]}"  # for reports; not saved
    if steps > 0:
        learned = learned_fit(target, budget, bias, **learned_options)
        learned_error = relative_error(learned.to_dense(), target)
        if learned.relative_cost() <= budget and learned_error < error:
            best, error = learned, learned_error
            best.fit_method = "learned"
    best.eval()
    log.debug("GBLR fit %s at %.3f: error %.4f", tuple(target.shape), budget, error)
    return best


def structured_from_dense(name: str, weight: torch.Tensor, budget: float, bias: torch.Tensor | None = None,
                          **options) -> StructuredLinear:
    """Fit family ``name`` to a dense ``(out, in)`` weight at ``budget``: :func:`fit_gblr` for GBLR, the
    family's projection for the others. The fit runs on the CPU (SVDs in float64, greedy choices on the
    host); the layer comes back on the weight's device."""
    family = family_class(name)
    check_weight(weight)
    bias = None if bias is None else bias.detach().cpu()
    if name == "gblr":
        layer = fit_gblr(weight.detach().cpu(), check_budget(budget), bias, **options)
    else:
        layer = family.from_dense(weight.detach().cpu(), budget, bias, **options)
    return layer.to(weight.device)
