"""Fitting a GBLR layer to a pretrained dense matrix under a budget.

Two kinds of candidates, the best one wins:

- adaptive block-low-rank fits: tile the matrix, take every tile's rank-1 SVD pieces, and keep those
  with the most energy per MAC until the budget is spent (one grid is the whole matrix: the optimal
  low-rank matrix, so the result is never worse than low-rank, which GBLR contains);
- the learned fit of SPEC section 5: all rank-1 SVD components, each starting on the shortest intervals
  that hold most of its singular vectors' energy (SPEC starts from full widths and random starts, which
  cannot find blocks), then Adam on ``||W_hat - W||_F^2 / ||W||_F^2`` with exact masks while the structure
  learner shrinks the widths to the budget.
"""

from __future__ import annotations

import logging

import torch

from .learn import StructureLearner, param_groups
from .mask import shortest_cyclic_windows
from .structured.gblr import GBLRLinear

__all__ = ["fit_gblr", "learned_fit", "block_low_rank_fit", "relative_error"]

log = logging.getLogger(__name__)


def relative_error(approx: torch.Tensor, weight: torch.Tensor) -> float:
    weight = weight.detach().double()
    return float((approx.detach().double() - weight).norm() / weight.norm().clamp_min(1e-300))


def _splits(length: int, parts: int) -> list[tuple[int, int]]:
    """(start, size) of ``parts`` nearly equal consecutive pieces of ``range(length)``."""
    edges = [round(i * length / parts) for i in range(parts + 1)]
    return [(a, b - a) for a, b in zip(edges, edges[1:])]


def block_low_rank_fit(weight: torch.Tensor, budget: float, grid: int, bias=None) -> GBLRLinear:
    """Best rank-1 pieces of a ``grid x grid`` tiling, chosen greedily by energy per MAC.

    Every tile's SVD gives rank-1 pieces of energy ``s_k^2`` and cost ``h + w``; taking the pieces with
    the most energy per MAC until the budget is spent gives a block-low-rank matrix with a rank per tile
    adapted to the matrix (a GBLR special case). ``grid=1`` is the optimal low-rank matrix.
    """
    m, n = weight.shape
    grid = max(1, min(grid, m, n))
    target = weight.detach().double()
    pieces = []  # (energy per MAC, tile row interval, tile column interval, u, v)
    for row_start, h in _splits(m, grid):
        for col_start, w in _splits(n, grid):
            p, sv, qh = torch.linalg.svd(target[row_start : row_start + h, col_start : col_start + w], full_matrices=False)
            for k in range(sv.shape[0]):
                pieces.append((float(sv[k] ** 2) / (h + w), (row_start, h), (col_start, w), p[:, k] * sv[k], qh[k]))
    pieces.sort(key=lambda piece: -piece[0])
    allowed, spent, chosen = budget * m * n, 0, []
    for piece in pieces:
        cost = piece[1][1] + piece[2][1]
        if spent + cost <= allowed:
            chosen.append(piece)
            spent += cost
    if not chosen:
        raise ValueError(f"budget {budget:g} is below the cost of one rank-1 piece of a {m}x{n} matrix tiled {grid}x{grid}")
    out_factors = target.new_zeros(len(chosen), 1, m)
    in_factors = target.new_zeros(len(chosen), 1, n)
    for i, (_, (r0, h), (c0, w), u, v) in enumerate(chosen):
        out_factors[i, 0, r0 : r0 + h] = u
        in_factors[i, 0, c0 : c0 + w] = v
    return GBLRLinear.from_intervals(
        [piece[1] for piece in chosen], [piece[2] for piece in chosen],
        out_factors.to(weight.dtype), in_factors.to(weight.dtype), bias,
    )


def learned_fit(
    weight: torch.Tensor,
    budget: float,
    bias: torch.Tensor | None = None,
    steps: int = 200,
    lr: float = 5e-3,
    structure_lr: float = 0.0,
    keep: float = 0.99,
) -> GBLRLinear:
    """SPEC section 5: all rank-1 SVD components (intervals from their energy), Adam on the relative
    error while the structure learner shrinks the widths to the budget."""
    layer = GBLRLinear.from_dense(weight.detach(), bias=bias)
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
    # them. Gradient steps on widths/starts (SPEC: 20/min(m, n)) made the fit of a block-diagonal
    # matrix worse here (relative error 0.005 without, 0.05 to 0.3 with lr 0.002 to 0.03).
    optimizer = torch.optim.Adam(param_groups(layer, lr=lr, weight_decay=0.0, structure_lr=structure_lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.01, 1.0 - s / steps))
    learner = StructureLearner(layer, optimizer, target=budget, total_steps=steps, ramp=(0.0, 0.5))
    target = weight.detach()
    scale = target.double().pow(2).sum().to(target.dtype)
    for _ in range(steps):
        loss = (layer.effective_weight(hard=False) - target).pow(2).sum() / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        learner.step()
    layer.eval()
    return layer


def fit_gblr(
    weight: torch.Tensor,
    budget: float,
    bias: torch.Tensor | None = None,
    grids: tuple[int, ...] = (1, 2, 4, 8, 16),
    **learned_options,
) -> GBLRLinear:
    """The best of: adaptive block-low-rank fits on several tilings (``grid=1`` is the optimal low-rank
    matrix, so the result is never worse than low-rank) and the learned fit (:func:`learned_fit`,
    skipped with ``steps=0``). Candidates over the budget are discarded."""
    target = weight.detach()
    candidates = [block_low_rank_fit(target, budget, grid, bias) for grid in grids]
    if learned_options.get("steps", 200) > 0:
        candidates.append(learned_fit(target, budget, bias, **learned_options))
    scored = []
    for layer in candidates:
        layer.eval()
        if layer.relative_cost() <= budget:
            with torch.no_grad():
                scored.append((relative_error(layer.to_dense(), target), layer))
    error, best = min(scored, key=lambda pair: pair[0])
    log.debug("GBLR fit %s at %.3f: error %.4f", tuple(target.shape), budget, error)
    return best
