"""Test matrices with hidden block structure: a few irregular, partly overlapping low-rank blocks plus
noise, the structure a GBLR fit of a dense matrix should find (``gblr.discover.block_pursuit``)."""

from __future__ import annotations

import math

import torch

__all__ = ["overlapping_blocks"]


def overlapping_blocks(seed: int, rows: int = 200, cols: int = 320, blocks: int = 5, rank: int = 10,
                       cost: float = 0.175, noise: float = 0.003) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """A float64 ``rows x cols`` matrix: ``blocks`` rank-``rank`` blocks of random shapes and places whose
    rank-1 pieces together cost ``cost`` of the dense matrix's MACs, plus Gaussian noise of relative
    Frobenius norm ``noise``. Returns the matrix and each block's ``(row, height, col, width)``."""
    generator = torch.Generator().manual_seed(seed)
    perimeter = cost * rows * cols / (blocks * rank)  # height + width of every block
    matrix = torch.zeros(rows, cols, dtype=torch.float64)
    windows = []
    for _ in range(blocks):
        share = 0.3 + 0.4 * float(torch.rand(1, generator=generator))  # the height's part of the perimeter
        height = max(1, min(rows, round(perimeter * share)))
        width = max(1, min(cols, round(perimeter - height)))
        row = int(torch.randint(0, rows - height + 1, (1,), generator=generator))
        col = int(torch.randint(0, cols - width + 1, (1,), generator=generator))
        left = torch.randn(height, rank, generator=generator, dtype=torch.float64)
        right = torch.randn(rank, width, generator=generator, dtype=torch.float64)
        matrix[row : row + height, col : col + width] += left @ right / math.sqrt(rank)
        windows.append((row, height, col, width))
    scatter = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return matrix + noise * matrix.norm() / scatter.norm() * scatter, windows
