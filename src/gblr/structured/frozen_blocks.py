"""The effective weight of a GBLR layer whose structure does not train, built block by block.

While widths and starts are frozen (recovery fine-tuning after compression), only the factors train, and
only their entries inside each component's intervals matter. Building the weight as ``sum_k U_k^T V_k``
over full-length masked factors costs ``K r m n`` multiply-adds, more than the layer's own product for
the thousands of small pieces a fitted block-low-rank layer has; cropping every component to its
intervals costs ``sum_k r h_k w_k``, at most a few percent of it.

Components with identical intervals are merged into one block of the summed rank; blocks of one shape
form a group whose products run as one batched matmul (ranks padded with a zero factor entry), then
one scatter-add places the group into the weight. A fitted layer has a handful of block shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mask import interval_offsets, interval_sizes

__all__ = ["FrozenBlocks"]


@dataclass
class _ShapeGroup:
    out_index: torch.Tensor  # (blocks, rank, h): flat positions in the output factors, padding -> the zero entry
    in_index: torch.Tensor  # (blocks, rank, w): flat positions in the input factors, padding -> the zero entry
    weight_index: torch.Tensor  # (blocks * h * w,): flat positions in the weight


class FrozenBlocks:
    """Index tables of one structure (widths and starts of a layer at the time of construction)."""

    def __init__(self, out_widths, out_starts, in_widths, in_starts, rank: int, m: int, n: int, tile: int) -> None:
        self.shape = (m, n)
        heights, widths = interval_sizes(out_widths, m, tile).tolist(), interval_sizes(in_widths, n, tile).tolist()
        rows0, cols0 = interval_offsets(out_starts, m, tile).tolist(), interval_offsets(in_starts, n, tile).tolist()
        merged: dict[tuple[int, int, int, int], list[int]] = {}
        for k, key in enumerate(zip(rows0, heights, cols0, widths)):
            if key[1] > 0 and key[3] > 0:
                merged.setdefault(key, []).append(k)
        by_shape: dict[tuple[int, int], list] = {}
        for (r0, h, c0, w), members in merged.items():
            by_shape.setdefault((h, w), []).append((r0, c0, members))
        num_components = len(heights)
        out_zero, in_zero = num_components * rank * m, num_components * rank * n  # one zero appended to each
        self.groups: list[_ShapeGroup] = []
        self.macs = 0
        for (h, w), blocks in by_shape.items():
            block_rank = max(len(members) for _, _, members in blocks) * rank
            out_index = torch.full((len(blocks), block_rank, h), out_zero, dtype=torch.long)
            in_index = torch.full((len(blocks), block_rank, w), in_zero, dtype=torch.long)
            weight_index = []
            for b, (r0, c0, members) in enumerate(blocks):
                rows, cols = (r0 + torch.arange(h)) % m, (c0 + torch.arange(w)) % n
                ranks = (torch.tensor(members).unsqueeze(1) * rank + torch.arange(rank)).flatten()  # rows of (K*r, .)
                out_index[b, : len(ranks)] = ranks.unsqueeze(1) * m + rows
                in_index[b, : len(ranks)] = ranks.unsqueeze(1) * n + cols
                weight_index.append((rows.unsqueeze(1) * n + cols).flatten())
            self.groups.append(_ShapeGroup(out_index, in_index, torch.cat(weight_index)))
            self.macs += len(blocks) * block_rank * h * w

    def repointed(self, out_position: torch.Tensor, in_position: torch.Tensor) -> "FrozenBlocks":
        """The same blocks reading their factors from packed vectors instead of the full-length factors:
        ``out_position[i]`` is the packed position of flat entry ``i`` of the output factors, its last
        entry (the padding) that of a zero appended to the packed vector; likewise ``in_position``."""
        packed = FrozenBlocks.__new__(FrozenBlocks)
        packed.shape, packed.macs = self.shape, self.macs
        packed.groups = [_ShapeGroup(out_position[g.out_index], in_position[g.in_index], g.weight_index) for g in self.groups]
        return packed

    def to(self, device: torch.device) -> "FrozenBlocks":
        for group in self.groups:
            for name in ("out_index", "in_index", "weight_index"):
                setattr(group, name, getattr(group, name).to(device))
        return self

    def weight(self, out_factors: torch.Tensor, in_factors: torch.Tensor) -> torch.Tensor:
        """``(m, n)`` weight of factors ``(K, r, m)``, ``(K, r, n)`` on this structure, or of packed factor
        vectors for :meth:`repointed` blocks (differentiable)."""
        m, n = self.shape
        zero = out_factors.new_zeros(1)
        out_flat = torch.cat([out_factors.reshape(-1), zero])
        in_flat = torch.cat([in_factors.reshape(-1), zero])
        weight = out_factors.new_zeros(m * n)
        for group in self.groups:
            blocks = out_flat[group.out_index].transpose(1, 2) @ in_flat[group.in_index]  # (blocks, h, w)
            weight = weight.index_add(0, group.weight_index, blocks.reshape(-1).to(weight.dtype))  # bf16 under autocast
        return weight.view(m, n)
