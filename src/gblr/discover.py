"""Finding block structure in a dense matrix: greedy block pursuit.

A GBLR layer is a sum of rank-1 pieces, each living on one window of rows and one of columns, costing
the two windows' lengths in MACs per token. Block pursuit builds one from a dense matrix piece by piece:
every step adds the piece that removes the most squared error per MAC from what is left, then all
pieces are refitted together on their windows.

Finding a piece is a local search: from the top singular pair of a starting window, alternately choose
the row window that keeps the most of the left vector's energy per MAC, then the column window for the
right one, until the windows stop moving. Starting only from the whole matrix finds windows that
straddle several blocks (its top singular vectors mix them), so the search also starts from every tile
of a coarse grid and keeps the best result.

This is a candidate of :func:`gblr.fit.fit_gblr` (``pursuit=True``); it costs a few seconds on a
200 x 320 matrix, far more than the tilings, so it is not tried by default.
"""

from __future__ import annotations

import torch

from .structured.gblr import GBLRLinear

__all__ = ["block_pursuit"]


def _best_window(energy: torch.Tensor, other_side: int) -> tuple[int, int, float]:
    """The cyclic window ``(start, size)`` maximising ``energy[window].sum() / (size + other_side)``, and
    that ratio: a rank-1 piece on it removes that much squared error per MAC."""
    length = energy.numel()
    prefix = torch.cat([energy.new_zeros(1), torch.cat([energy, energy]).cumsum(0)])
    starts = torch.arange(length).unsqueeze(1)
    sizes = torch.arange(1, length + 1).unsqueeze(0)
    ratio = (prefix[starts + sizes] - prefix[starts]) / (sizes + other_side)
    best = int(ratio.argmax())
    return best // length, best % length + 1, float(ratio.flatten()[best])


def _window(start: int, size: int, length: int) -> torch.Tensor:
    return (start + torch.arange(size)) % length


def _top_pair(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-1 approximation of ``block`` as ``(left * singular value, right)``."""
    u, s, vh = torch.linalg.svd(block, full_matrices=False)
    return u[:, 0] * s[0], vh[0]


def _climb(residual: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, rounds: int = 30):
    """Windows of one piece, searched from the top singular pair of ``residual[rows][:, cols]``;
    returns the row and column windows and the energy per MAC of the best piece on them."""
    m, n = residual.shape
    _, right = _top_pair(residual[rows][:, cols])
    found, ratio = None, 0.0
    for _ in range(rounds):
        left = residual[:, cols] @ right
        row_start, height, _ = _best_window(left.square(), len(cols))
        rows = _window(row_start, height, m)
        left = left[rows] / left[rows].norm().clamp_min(1e-300)
        right_full = residual[rows].T @ left
        col_start, width, ratio = _best_window(right_full.square(), height)
        cols = _window(col_start, width, n)
        right = right_full[cols] / right_full[cols].norm().clamp_min(1e-300)
        if found == (row_start, height, col_start, width):
            break
        found = (row_start, height, col_start, width)
    return rows, cols, ratio


def even_splits(length: int, parts: int) -> list[tuple[int, int]]:
    """(start, size) of ``parts`` nearly equal consecutive pieces of ``range(length)``."""
    edges = [round(i * length / parts) for i in range(parts + 1)]
    return [(a, b - a) for a, b in zip(edges, edges[1:])]


def _grid(length: int, parts: int) -> list[torch.Tensor]:
    return [torch.arange(start, start + size) for start, size in even_splits(length, parts) if size]


@torch.no_grad()
def block_pursuit(weight: torch.Tensor, budget: float, bias: torch.Tensor | None = None, grid: int = 3,
                  sweeps: int = 10) -> GBLRLinear:
    """A GBLR layer of rank-1 pieces on discovered windows, costing at most ``budget`` of ``weight``'s
    dense MACs: greedy pieces by squared error removed per MAC (windows searched from the whole matrix
    and from every tile of a ``grid x grid`` tiling), then ``sweeps`` rounds of refitting every piece to
    what the others leave on its windows (each round lowers the error)."""
    target = weight.detach().double().cpu()
    m, n = target.shape
    allowed = budget * m * n
    starts = [(torch.arange(m), torch.arange(n))] + [(r, c) for r in _grid(m, grid) for c in _grid(n, grid)]
    residual, pieces, spent = target.clone(), [], 0
    while True:
        rows, cols, _ = max((_climb(residual, r, c) for r, c in starts), key=lambda found: found[2])
        if spent + len(rows) + len(cols) > allowed:
            break
        left, right = _top_pair(residual[rows][:, cols])
        residual[rows.unsqueeze(1), cols] -= torch.outer(left, right)
        pieces.append([rows, cols, left, right])
        spent += len(rows) + len(cols)
    if not pieces:
        raise ValueError(f"budget {budget:g} is below the cost of one rank-1 piece of a {m}x{n} matrix")
    for _ in range(sweeps):
        for piece in pieces:
            rows, cols, left, right = piece
            where = (rows.unsqueeze(1), cols)
            residual[where] += torch.outer(left, right)
            piece[2], piece[3] = _top_pair(residual[where])
            residual[where] -= torch.outer(piece[2], piece[3])
    out_factors = torch.zeros(len(pieces), 1, m, dtype=torch.float64)
    in_factors = torch.zeros(len(pieces), 1, n, dtype=torch.float64)
    for k, (rows, cols, left, right) in enumerate(pieces):
        out_factors[k, 0, rows], in_factors[k, 0, cols] = left, right
    layer = GBLRLinear.from_intervals([(int(p[0][0]), len(p[0])) for p in pieces], [(int(p[1][0]), len(p[1])) for p in pieces],
                                      out_factors.to(weight.dtype), in_factors.to(weight.dtype),
                                      None if bias is None else bias.detach().cpu())
    layer.eval()
    return layer
