"""Exact GBLR constructions of the classical structured matrices.

Each function returns a :class:`GBLRLinear` whose effective weight equals the reference matrix and whose
counted cost equals the special case's own cost:

- low-rank ``U V^T`` of rank R: R/r full-width components, cost ``R (m + n)``;
- block-sparse (block-diagonal as a pattern): one rank-``min(bh, bw)`` component per nonzero block,
  cost ``bh * bw`` per block (the dense block);
- block-low-rank: one rank-``r'`` component per grid block, cost ``r' (bh + bw)`` per block.
"""

from __future__ import annotations

import torch

from ..linalg import thin_svd
from .gblr import GBLRLinear

__all__ = ["gblr_lowrank", "gblr_block_sparse", "gblr_block_diagonal", "gblr_block_low_rank", "block_mask"]


def _grid(weight: torch.Tensor, block_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', weight)!r}")
    bh, bw = block_shape
    m, n = weight.shape
    if bh < 1 or bw < 1 or m % bh or n % bw:
        raise ValueError(f"block_shape {tuple(block_shape)} must divide the weight's shape {tuple(weight.shape)}")
    return m // bh, n // bw, bh, bw


def _pattern(pattern, rows: int, cols: int) -> torch.Tensor:
    if pattern is None:
        return torch.ones(rows, cols, dtype=torch.bool)
    pattern = torch.as_tensor(pattern, dtype=torch.bool).cpu()
    if pattern.shape != (rows, cols):
        raise ValueError(f"pattern must have shape ({rows}, {cols}) (blocks per row, per column), got {tuple(pattern.shape)}")
    if not pattern.any():
        raise ValueError("pattern must select at least one block")
    return pattern


def block_mask(pattern: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """Expand a (block rows, block cols) boolean pattern to an element mask."""
    bh, bw = block_shape
    return pattern.repeat_interleave(bh, 0).repeat_interleave(bw, 1)


def gblr_lowrank(u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, rank: int = 1) -> GBLRLinear:
    """The low-rank matrix ``u @ v.T`` (``u``: (m, R), ``v``: (n, R)) as R/rank full-width components."""
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
        raise ValueError(f"u and v must be (m, R) and (n, R), got {tuple(u.shape)} and {tuple(v.shape)}")
    (m, total), n = u.shape, v.shape[0]
    if total % rank:
        raise ValueError(f"rank={rank} must divide the number of columns of u and v ({total})")
    k = total // rank
    out_factors = u.T.reshape(k, rank, m)
    in_factors = v.T.reshape(k, rank, n)
    return GBLRLinear.from_intervals([(0, m)] * k, [(0, n)] * k, out_factors, in_factors, bias)


def _blocks_to_gblr(weight, block_shape, pattern, block_rank: int, bias) -> GBLRLinear:
    rows, cols, bh, bw = _grid(weight, block_shape)
    pattern = _pattern(pattern, rows, cols)
    m, n = weight.shape
    out_intervals, in_intervals, us, vs = [], [], [], []
    for i, j in pattern.nonzero().tolist():
        block = weight[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw].to(torch.float64)
        p, s, qh = thin_svd(block)
        u = torch.zeros(block_rank, m, dtype=torch.float64, device=weight.device)
        v = torch.zeros(block_rank, n, dtype=torch.float64, device=weight.device)
        u[:, i * bh : (i + 1) * bh] = (p[:, :block_rank] * s[:block_rank]).T
        v[:, j * bw : (j + 1) * bw] = qh[:block_rank]
        us.append(u)
        vs.append(v)
        out_intervals.append((i * bh, bh))
        in_intervals.append((j * bw, bw))
    out_factors = torch.stack(us).to(weight.dtype)
    in_factors = torch.stack(vs).to(weight.dtype)
    return GBLRLinear.from_intervals(out_intervals, in_intervals, out_factors, in_factors, bias)


def gblr_block_sparse(weight: torch.Tensor, block_shape: tuple[int, int], pattern=None, bias=None) -> GBLRLinear:
    """The blocks of ``weight`` selected by ``pattern`` (boolean, blocks per row x per column; all if
    None), everything else zero: one full-rank component per selected block."""
    bh, bw = block_shape
    return _blocks_to_gblr(weight, block_shape, pattern, min(bh, bw), bias)


def gblr_block_diagonal(blocks: list[torch.Tensor], bias=None) -> GBLRLinear:
    """Block-diagonal matrix of equally shaped ``blocks``."""
    if not blocks or any(b.shape != blocks[0].shape or b.dim() != 2 for b in blocks):
        raise ValueError("blocks must be a non-empty list of 2-D tensors of one shape")
    bh, bw = blocks[0].shape
    count = len(blocks)
    weight = torch.zeros(count * bh, count * bw, dtype=blocks[0].dtype, device=blocks[0].device)
    for i, b in enumerate(blocks):
        weight[i * bh : (i + 1) * bh, i * bw : (i + 1) * bw] = b
    return gblr_block_sparse(weight, (bh, bw), torch.eye(count, dtype=torch.bool), bias)


def gblr_block_low_rank(
    weight: torch.Tensor, block_shape: tuple[int, int], block_rank: int, pattern=None, bias=None
) -> GBLRLinear:
    """Each selected grid block of ``weight`` replaced by its best rank-``block_rank`` approximation."""
    bh, bw = block_shape
    if not (1 <= block_rank <= min(bh, bw)):
        raise ValueError(f"block_rank must be in [1, {min(bh, bw)}] for blocks {bh}x{bw}, got {block_rank}")
    return _blocks_to_gblr(weight, block_shape, pattern, block_rank, bias)
