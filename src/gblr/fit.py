"""Fitting a GBLR layer to a pretrained dense matrix under a budget.

Two kinds of candidates, the best one wins:

- adaptive block-low-rank fits: tile the matrix, take every tile's rank-1 SVD pieces, and keep those
  with the most energy per MAC until the budget is spent (one grid is the whole matrix: the optimal
  low-rank matrix, so the result is never worse than low-rank, which GBLR contains);
- with ``pursuit=True``, block pursuit (:mod:`gblr.discover`): pieces on windows found anywhere, not on a grid;
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

from .calibration import damped, whitening
from .discover import block_pursuit, even_splits
from .learn import StructureLearner, param_groups
from .mask import shortest_cyclic_windows
from .step import training_step
from .structured import StructuredLinear, family_class
from .structured.base import check_budget, check_weight
from .structured.gblr import GBLRLinear

__all__ = ["structured_from_dense", "fit_gblr", "learned_fit", "block_low_rank_fit", "block_low_rank_error_curve", "output_error",
           "relative_error"]

log = logging.getLogger(__name__)

DEFAULT_GRIDS = (1, 2, 4, 8, 16)


def relative_error(approx: torch.Tensor, weight: torch.Tensor) -> float:
    weight = weight.detach().double()
    return float((approx.detach().double() - weight).norm() / weight.norm().clamp_min(1e-300))


def _leading_pieces(tiles: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` leading singular pieces of each matrix of a batch ``(..., h, w)``, largest first, as
    ``(left (..., h, k), energy (..., k), right (..., k, w))``: piece ``k`` is ``left[..., :, k] right[..., k, :]``
    and ``energy`` its squared norm.

    From the eigendecomposition of the smaller Gram matrix, 2-4x faster than an SVD on CPU: each
    piece is the exact projection of the matrix on an eigenvector (``T v v^T``), so the pieces stay
    orthogonal and the sum of the chosen ones is the best fit of their rank; only energies near
    ``eps * ||T||^2``, never chosen before larger ones, lose relative accuracy."""
    h, w = tiles.shape[-2:]
    tall = w <= h
    energy, vectors = torch.linalg.eigh(tiles.mT @ tiles if tall else tiles @ tiles.mT)
    energy, vectors = energy.flip(-1)[..., :rank].clamp_min(0), vectors.flip(-1)[..., :rank]
    if tall:
        return tiles @ vectors, energy, vectors.mT
    return vectors, energy, vectors.mT @ tiles


class _TilePieces:
    """Every rank-1 SVD piece of every tile of a ``grid x grid`` tiling, sorted by energy per MAC.

    Tiles of equal shape are decomposed in one batched SVD. Pieces of one tile are orthogonal and tiles
    are disjoint, so the squared error of any chosen set is the total energy minus the chosen energies:
    error curves over many budgets cost no further SVDs.
    """

    def __init__(self, weight: torch.Tensor, grid: int, gram: torch.Tensor | None = None) -> None:
        m, n = weight.shape
        grid = max(1, min(grid, m, n))
        target = weight.detach().double()
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for row_start, h in even_splits(m, grid):
            for col_start, w in even_splits(n, grid):
                by_shape.setdefault((h, w), []).append((row_start, col_start))
        # Data-aware: each tile is fitted in the coordinates whitened by its columns' input statistics,
        # ||(T_fit - T) L_J||, so a piece's energy is the output error it removes (exact for grid 1; for
        # finer grids the correlations between column tiles are left out). Pieces keep their tile's support.
        whiten = {}
        self.gram, self.whiten = gram, whiten
        if gram is not None:
            for col_start, w in even_splits(n, grid):
                whiten[col_start] = torch.linalg.cholesky(gram[col_start : col_start + w, col_start : col_start + w])
        self.target, self.grid = target, grid
        self.groups = []  # per tile shape: (h, w, tile origins, left pieces, right pieces)
        energy, cost, where = [], [], []
        self.shape, self.total = (m, n), 0.0
        for (h, w), origins in by_shape.items():
            tiles = torch.stack([target[r : r + h, c : c + w] for r, c in origins])
            if gram is not None:
                factors = torch.stack([whiten[c] for _, c in origins])
                tiles = tiles @ factors
            left, piece_energy, right = _leading_pieces(tiles)
            if gram is not None:  # back to the original coordinates: right L_J^-1
                right = torch.linalg.solve_triangular(factors, right, upper=False, left=False)
            self.total += float(tiles.pow(2).sum())
            self.groups.append((h, w, origins, left, right))
            g = len(self.groups) - 1
            energy.append(piece_energy.flatten())
            cost.append(torch.full((piece_energy.numel(),), float(h + w), dtype=torch.float64))
            tile, rank = torch.meshgrid(torch.arange(len(origins)), torch.arange(piece_energy.shape[1]), indexing="ij")
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

    def _pieces(self, budget: float) -> list[tuple[int, int, int, int, torch.Tensor, torch.Tensor]]:
        """The greedy choice as ``(row, height, col, width, left, right)`` rank-1 pieces (float64)."""
        chosen = self.choose(budget)
        if not len(chosen):
            m, n = self.shape
            raise ValueError(f"budget {budget:g} is below the cost of one rank-1 piece of a {m}x{n} matrix")
        pieces = []
        for g, tile, rank in self.where[torch.from_numpy(chosen)].tolist():
            h, w, origins, left, right = self.groups[g]
            r0, c0 = origins[tile]
            pieces.append((r0, h, c0, w, left[tile, :, rank], right[tile, rank]))
        return pieces

    def layer(self, budget: float, dtype: torch.dtype, bias: torch.Tensor | None = None, sweeps: int = 0) -> GBLRLinear:
        """The greedy choice at ``budget`` as a GBLR layer; with a gram and ``sweeps`` > 0, refitted first
        (:meth:`_refit`)."""
        pieces = self._pieces(budget)
        if self.gram is not None and sweeps > 0 and self.grid > 1:  # one tile: already exact
            pieces = self._refit(pieces, sweeps)
        m, n = self.shape
        out_factors = torch.zeros(len(pieces), 1, m, dtype=torch.float64)
        in_factors = torch.zeros(len(pieces), 1, n, dtype=torch.float64)
        for i, (r0, h, c0, w, left, right) in enumerate(pieces):
            out_factors[i, 0, r0 : r0 + h] = left
            in_factors[i, 0, c0 : c0 + w] = right
        return GBLRLinear.from_intervals([(p[0], p[1]) for p in pieces], [(p[2], p[3]) for p in pieces],
                                         out_factors.to(dtype), in_factors.to(dtype), bias)

    def _refit(self, pieces: list, sweeps: int) -> list:
        """The chosen tiles and ranks refitted under the full input statistics ``G``: the greedy choice
        measured each tile in coordinates whitened by its own columns only, leaving out the correlations
        between column tiles. Rows are independent in ``tr(E G E^T)``, so row bands are refitted side by
        side, one column tile at a time: the best rank-k block ``B`` on columns ``J`` given the others'
        residual ``R`` minimises ``||B L_J - R G[:, J] L_J^-T||`` (``G_JJ = L_J L_J^T``), a truncated SVD,
        batched over the bands' tiles of one column tile. Every update lowers the output error (block
        coordinate descent)."""
        target, gram = self.target, self.gram
        ranks: dict[tuple[int, int, int, int], int] = {}
        blocks: dict[tuple[int, int, int, int], torch.Tensor] = {}
        for r0, h, c0, w, left, right in pieces:
            key = (r0, h, c0, w)
            ranks[key] = ranks.get(key, 0) + 1
            blocks[key] = blocks.get(key, 0) + torch.outer(left, right)
        residual = target.clone()
        for (r0, h, c0, w), block in blocks.items():
            residual[r0 : r0 + h, c0 : c0 + w] -= block
        columns: dict[tuple[int, int], dict[int, list]] = {}  # column tile -> tile height -> its tiles
        for key in sorted(ranks, key=lambda k: (k[2], k[0])):
            columns.setdefault((key[2], key[3]), {}).setdefault(key[1], []).append(key)
        factors = {}
        for _ in range(sweeps):
            for (c0, w), by_height in columns.items():
                chol = self.whiten[c0]
                for tiles in by_height.values():
                    for r0, h, _, _ in tiles:
                        residual[r0 : r0 + h, c0 : c0 + w] += blocks[r0, h, c0, w]
                    rows = torch.cat([torch.arange(r0, r0 + h) for r0, h, _, _ in tiles])
                    projected = torch.linalg.solve_triangular(chol, (residual[rows] @ gram[:, c0 : c0 + w]).T, upper=False).T
                    rank = torch.tensor([ranks[key] for key in tiles])
                    left, _, right = _leading_pieces(projected.view(len(tiles), -1, w), int(rank.max()))
                    left = left * (torch.arange(left.shape[-1]) < rank.unsqueeze(1)).unsqueeze(1)  # each tile's own rank
                    right = torch.linalg.solve_triangular(chol.T, right.mT, upper=True).mT
                    fitted = left @ right
                    for i, key in enumerate(tiles):
                        blocks[key], factors[key] = fitted[i], (left[i], right[i])
                        residual[key[0] : key[0] + key[1], c0 : c0 + w] -= fitted[i]
        return [(*key, factors[key][0][:, k], factors[key][1][k]) for key in ranks for k in range(ranks[key])]


def block_low_rank_fit(weight: torch.Tensor, budget: float, grid: int, bias=None, gram=None,
                       damping: float = 0.01) -> GBLRLinear:
    """Best rank-1 pieces of a ``grid x grid`` tiling, chosen greedily by energy per MAC.

    Every tile's SVD gives rank-1 pieces of energy ``s_k^2`` and cost ``h + w``; taking the pieces with
    the most energy per MAC until the budget is spent gives a block-low-rank matrix with a rank per tile
    adapted to the matrix (a GBLR special case). ``grid=1`` is the optimal low-rank matrix. With ``gram``
    (the inputs' second moment, :func:`gblr.calibration.input_grams`) the pieces are those of the
    output error instead of the weight error.
    """
    return _TilePieces(weight, grid, (None if gram is None else damped(gram, damping))).layer(budget, weight.dtype, bias)


def block_low_rank_error_curve(weight: torch.Tensor, budgets, grids: tuple[int, ...] = DEFAULT_GRIDS,
                               gram: torch.Tensor | None = None, damping: float = 0.01) -> list[float]:
    """Relative error of the best block-low-rank fit over ``grids`` at each budget (an upper bound of
    :func:`fit_gblr`'s error), from one batched SVD per tiling; with ``gram``, of the outputs (for
    tilings finer than 1x1, as if the column tiles' inputs were uncorrelated)."""
    gram = (None if gram is None else damped(gram, damping))
    tilings = [_TilePieces(weight, grid, gram) for grid in grids]
    return [min(t.relative_error(b) for t in tilings) for b in budgets]


def output_error(approx: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``||(W_fit - W) X^T|| / ||W X^T||`` for inputs of second moment ``gram``: the relative error of the
    layer's outputs on the calibration data."""
    reference = weight.detach().double().cpu()
    difference = approx.detach().double().cpu() - reference
    gram = gram.detach().double().cpu()
    error = float(((difference @ gram) * difference).sum().clamp_min(0))
    total = float(((reference @ gram) * reference).sum())
    return math.sqrt(error / total) if total > 0 else 0.0


def learned_fit(
    weight: torch.Tensor,
    budget: float,
    bias: torch.Tensor | None = None,
    steps: int = 200,
    lr: float = 5e-3,
    structure_lr: float = 0.0,
    keep: float = 0.99,
    gram: torch.Tensor | None = None,
) -> GBLRLinear:
    """The paper's learned fit: the leading rank-1 SVD components (intervals from their energy), Adam on the relative
    error while the structure learner shrinks the widths to the budget. With ``gram`` (a damped second
    moment of the inputs) the error is that of the outputs, ``tr(E G E^T) / tr(W G W^T)``."""
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
    metric = None if gram is None else gram.to(target.dtype)

    def error(difference: torch.Tensor) -> torch.Tensor:
        return difference.pow(2).sum() if metric is None else ((difference @ metric) * difference).sum()

    scale = error(target).detach()
    for _ in range(steps):
        training_step(lambda: error(layer.effective_weight(hard=False) - target) / scale, optimizer, schedule, learner)
    layer.eval()
    return layer


def fit_gblr(
    weight: torch.Tensor,
    budget: float,
    bias: torch.Tensor | None = None,
    grids: tuple[int, ...] = DEFAULT_GRIDS,
    gram: torch.Tensor | None = None,
    damping: float = 0.01,
    pursuit: bool = False,
    sweeps: int = 4,
    **learned_options,
) -> GBLRLinear:
    """The best of: adaptive block-low-rank fits on several tilings (``grid=1`` is the optimal low-rank
    matrix, so the result is never worse than low-rank) and the learned fit (:func:`learned_fit`,
    skipped with ``steps=0``). Candidates over the budget are discarded.

    With ``gram``, the second moment of the layer's inputs on calibration data
    (:func:`gblr.calibration.input_grams`), every candidate minimises the error of the layer's outputs
    instead of its weights (``damping`` as in :func:`gblr.calibration.damped`), and the best is chosen by it;
    the 1x1 tiling is then the optimal output-error low-rank fit, and finer tilings keep the tiles and
    ranks chosen under each column tile's own statistics but are refitted under the full ones for
    ``sweeps`` rounds (:meth:`_TilePieces._refit`).

    ``pursuit=True`` adds the pieces that :func:`gblr.discover.block_pursuit` finds on the weight (windows
    searched freely, not on a grid: a minute or more per matrix) as one more candidate, judged by the same error."""
    check_weight(weight)
    steps = learned_options.get("steps", 200)
    for name, value in (("steps", steps), ("sweeps", sweeps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    target = weight.detach()
    if gram is not None:
        gram = damped(gram, damping, features=target.shape[1])
        learned_options["gram"] = gram

    def measure(layer) -> float:
        return relative_error(layer.to_dense(), target) if gram is None else output_error(layer.to_dense(), target, gram)

    tilings = [_TilePieces(target, grid, gram) for grid in grids]
    if gram is None:  # exact from the singular values
        errors = [tiling.relative_error(budget) for tiling in tilings]
        choice = min(range(len(tilings)), key=errors.__getitem__)
        best = tilings[choice].layer(budget, target.dtype, bias)
    else:  # exact from the candidates, finer tilings refitted under the full statistics
        candidates = [tiling.layer(budget, torch.float64, bias, sweeps) if tiling.choose(budget).size else None
                      for tiling in tilings]
        errors = [math.inf if c is None else measure(c) for c in candidates]
        choice = min(range(len(tilings)), key=errors.__getitem__)
        best = candidates[choice].to(target.dtype)
    error = errors[choice]
    best.fit_method = f"block-low-rank {grids[choice]}x{grids[choice]}"  # for reports; not saved
    if pursuit:
        found = block_pursuit(target, budget, bias)
        found_error = measure(found)
        if found_error < error:
            best, error = found, found_error
            best.fit_method = "block pursuit"
    if steps > 0:
        learned = learned_fit(target, budget, bias, **learned_options)
        learned_error = measure(learned)
        if learned.relative_cost() <= budget and learned_error < error:
            best, error = learned, learned_error
            best.fit_method = "learned"
    best.eval()
    log.debug("GBLR fit %s at %.3f: error %.4f", tuple(target.shape), budget, error)
    return best


#: Families whose fit can minimise the error of the layer's outputs on calibration data (``gram=``).
DATA_AWARE = ("gblr", "lowrank")


def check_data_aware(family: str, argument: str = "gram") -> None:
    """A one-line error unless ``family`` can be fitted to calibration data."""
    if family not in DATA_AWARE:
        raise ValueError(f"{argument}: fitting the outputs is available for {', '.join(DATA_AWARE)}, not {family}")


def structured_from_dense(name: str, weight: torch.Tensor, budget: float, bias: torch.Tensor | None = None,
                          gram: torch.Tensor | None = None, **options) -> StructuredLinear:
    """Fit family ``name`` to a dense ``(out, in)`` weight at ``budget``: :func:`fit_gblr` for GBLR, the
    family's projection for the others. With ``gram`` (the inputs' second moment on calibration data)
    the fit minimises the error of the outputs (GBLR and low-rank; low-rank then is the truncated SVD
    of the whitened weight ``W L``, mapped back). The fit runs on the CPU (SVDs in float64, greedy
    choices on the host); the layer comes back on the weight's device."""
    family = family_class(name)
    check_weight(weight)
    bias = None if bias is None else bias.detach().cpu()
    cpu = weight.detach().cpu()
    if gram is not None:
        check_data_aware(name)
    if name == "gblr":
        layer = fit_gblr(cpu, check_budget(budget), bias, gram=gram, **options)
    elif gram is not None:
        whiten = whitening(gram, options.pop("damping", 0.01), features=cpu.shape[1])
        layer = family.from_dense((cpu.double() @ whiten).to(cpu.dtype), budget, bias, **options)
        with torch.no_grad():  # U (V L) L^-1: the low-rank fit of the outputs
            layer.in_proj.copy_(torch.linalg.solve_triangular(whiten, layer.in_proj.double(), upper=False, left=False))
    else:
        layer = family.from_dense(cpu, budget, bias, **options)
    return layer.to(weight.device)
