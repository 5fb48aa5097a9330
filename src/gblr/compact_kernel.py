"""The compact GBLR form as two Triton launches per layer, whatever the number of blocks.

A compact layer is a list of merged blocks: block ``b`` reads a (cyclic) column range of the input and
adds into a (cyclic) column range of the output, through two factors (``x[:, in] @ first @ second``) or
one dense matrix (``x[:, in] @ first``). The generic executions in :mod:`gblr.compact` launch one or
more matmuls per block, which on a GPU costs more in launches and in strided accumulation than the
block products themselves. Here:

1. **contract**: one launch computes ``z[:, b] = x[:, in_b] @ first_b`` for every low-rank block,
   packing the rank-``R_b`` results side by side in one ``tokens x sum(R_b)`` buffer;
2. **expand**: one launch computes every output tile: it loops over exactly the blocks that cover the
   tile (a precomputed list) and sums ``z[:, b] @ second_b`` (or ``x[:, in_b] @ first_b`` for dense
   blocks) in registers, adds the bias and writes the tile once: no atomics, no zero-fill, no
   read-modify-write of the output.

Column ranges that wrap around are split into contiguous parts when the layout is built, so every load
reads a contiguous range. Products accumulate in float32; float32 inputs multiply in IEEE float32
unless ``torch.backends.cuda.matmul.allow_tf32`` is set (the same rule ``nn.Linear`` follows).

Runs on CUDA, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the generic executions need no Triton
    triton = None

__all__ = ["available", "KernelLayout"]


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` here."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _contract_kernel(
        x_ptr, first_ptr, z_ptr,
        item_block_ptr, item_rank_ptr,
        in_start1_ptr, in_size1_ptr, in_start2_ptr, in_size2_ptr, rank_ptr, z_col_ptr, first_offset_ptr,
        tokens, in_features, z_stride,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # Programs next to each other share a token tile (its rows of x stay in L2 across blocks).
        item = tl.program_id(0)
        block = tl.load(item_block_ptr + item)
        rank0 = tl.load(item_rank_ptr + item)
        rank = tl.load(rank_ptr + block)
        offset = tl.load(first_offset_ptr + block)
        rows = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        ranks = rank0 + tl.arange(0, BLOCK_R)
        row_ok = rows[:, None] < tokens
        rank_ok = ranks[None, :] < rank
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        # The input range in at most two contiguous parts; `first` holds their rows one after the other.
        size1 = tl.load(in_size1_ptr + block)
        for part in tl.static_range(2):
            row0 = size1 * part
            if part == 0:
                start = tl.load(in_start1_ptr + block)
                size = size1
            else:
                start = tl.load(in_start2_ptr + block)
                size = tl.load(in_size2_ptr + block)
            for k in range(0, size, BLOCK_K):
                ks = k + tl.arange(0, BLOCK_K)
                k_ok = ks < size
                a = tl.load(x_ptr + rows[:, None] * in_features + (start + ks)[None, :], mask=row_ok & k_ok[None, :], other=0.0)
                w = tl.load(first_ptr + offset + (row0 + ks)[:, None] * rank + ranks[None, :], mask=k_ok[:, None] & rank_ok, other=0.0)
                if UPCAST:  # Triton's interpreter multiplies bfloat16 tiles wrongly
                    a, w = a.to(tl.float32), w.to(tl.float32)
                if IEEE:
                    acc = tl.dot(a, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, w, acc)
        z_col = tl.load(z_col_ptr + block)
        tl.store(z_ptr + rows[:, None] * z_stride + (z_col + ranks)[None, :], acc.to(z_ptr.dtype.element_ty), mask=row_ok & rank_ok)

    @triton.jit
    def _expand_kernel(
        x_ptr, z_ptr, second_ptr, bias_ptr, y_ptr,
        tile_first_ptr, contrib_source_ptr, contrib_shift_ptr, contrib_low_ptr, contrib_high_ptr,
        source_is_z_ptr, source_start_ptr, source_size_ptr, second_offset_ptr, out_size_ptr,
        tokens, in_features, out_features, z_stride,
        HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        tile = tl.program_id(0)
        rows = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows[:, None] < tokens
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for c in range(tl.load(tile_first_ptr + tile), tl.load(tile_first_ptr + tile + 1)):
            source = tl.load(contrib_source_ptr + c)
            # Column j of the tile is column `shift + j` of this block's output, used where in [low, high).
            local = tl.load(contrib_shift_ptr + c) + tl.arange(0, BLOCK_N)
            col_ok = (local >= tl.load(contrib_low_ptr + c)) & (local < tl.load(contrib_high_ptr + c))
            is_z = tl.load(source_is_z_ptr + source)
            start = tl.load(source_start_ptr + source)
            size = tl.load(source_size_ptr + source)
            offset = tl.load(second_offset_ptr + source)
            out_size = tl.load(out_size_ptr + source)
            for k in range(0, size, BLOCK_K):
                ks = k + tl.arange(0, BLOCK_K)
                k_ok = ks < size
                if is_z:
                    a = tl.load(z_ptr + rows[:, None] * z_stride + (start + ks)[None, :], mask=row_ok & k_ok[None, :], other=0.0)
                else:
                    a = tl.load(x_ptr + rows[:, None] * in_features + (start + ks)[None, :], mask=row_ok & k_ok[None, :], other=0.0)
                w = tl.load(second_ptr + offset + ks[:, None] * out_size + local[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if UPCAST:  # Triton's interpreter multiplies bfloat16 tiles wrongly
                    a, w = a.to(tl.float32), w.to(tl.float32)
                if IEEE:
                    acc = tl.dot(a, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, w, acc)
        col_in = cols < out_features
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * out_features + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=row_ok & col_in[None, :])


def _split(start: int, size: int, length: int) -> list[tuple[int, int]]:
    """A cyclic range as (start, size) contiguous parts."""
    first = min(size, length - start)
    return [(start, first)] + ([(0, size - first)] if size > first else [])


@dataclass(frozen=True)
class Tiles:
    """Tile sizes: tokens per program, rank columns per contract program, output columns per expand
    program, reduction step."""

    tokens: int
    rank: int
    out: int
    k: int
    warps: int = 4
    stages: int = 3


def rank_tile(ranks: list[int]) -> int:
    """Rank columns per contract program: wide tiles reread the input less, narrow ones waste less on
    padding (a tile's input read counted as 32 rank columns of work)."""
    return min((16, 32, 64, 128), key=lambda tile: sum(math.ceil(r / tile) * (tile + 32) for r in ranks))


def default_tiles(dtype: torch.dtype, tokens: int, ranks: list[int]) -> Tiles:
    """Tile sizes that suit Hopper-class GPUs: wide tiles for many tokens, narrow ones for few."""
    columns = rank_tile(ranks)
    wide = dtype in (torch.bfloat16, torch.float16)
    if tokens >= 2048:
        return Tiles(128, columns, 128 if wide else 64, 64 if wide else 32, warps=8 if wide else 4)
    return Tiles(64, columns, 64, 64 if wide else 32, warps=4)


class KernelLayout:
    """The blocks of one compact layer packed for the two kernels, on one device and dtype.

    ``blocks``: ``(in_parts, out_parts, first, second)`` per merged block as :class:`gblr.compact._Slice`
    holds them (parts are ``(start, stop, first, last)`` feature ranges with their offset inside the
    block; ``first`` is ``w x R`` (low-rank) or ``w x h`` (dense), ``second`` ``R x h`` or None).
    """

    def __init__(self, blocks, in_features: int, out_features: int, device, dtype) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.device = dtype, device
        index = self._index
        firsts, seconds = [], []
        first_size = second_size = 0
        lowrank = {"start1": [], "size1": [], "start2": [], "size2": [], "rank": [], "z_col": [], "offset": []}
        # Sources of the expand kernel: a low-rank block's columns of z, or a dense block's input part.
        sources = {"is_z": [], "start": [], "size": [], "offset": [], "out_size": []}
        out_ranges = []  # per source: (output start, output size)
        self.z_columns = 0
        for in_parts, out_parts, first, second in blocks:
            h = sum(b - a for a, b, _, _ in out_parts)
            out_start = out_parts[0][0]
            if second is not None:
                parts = [(a, b - a) for a, b, _, _ in in_parts] + [(0, 0)]
                rank = first.shape[1]
                lowrank["start1"].append(parts[0][0])
                lowrank["size1"].append(parts[0][1])
                lowrank["start2"].append(parts[1][0])
                lowrank["size2"].append(parts[1][1])
                lowrank["rank"].append(rank)
                lowrank["z_col"].append(self.z_columns)
                lowrank["offset"].append(first_size)
                firsts.append(first.reshape(-1))
                first_size += first.numel()
                sources["is_z"].append(1)
                sources["start"].append(self.z_columns)
                sources["size"].append(rank)
                sources["offset"].append(second_size)
                sources["out_size"].append(h)
                out_ranges.append((out_start, h))
                seconds.append(second.reshape(-1))
                second_size += second.numel()
                self.z_columns += rank
                continue
            for a, b, fa, fb in in_parts:  # a dense block: one source per contiguous input part
                sources["is_z"].append(0)
                sources["start"].append(a)
                sources["size"].append(b - a)
                sources["offset"].append(second_size + fa * h)
                sources["out_size"].append(h)
                out_ranges.append((out_start, h))
            seconds.append(first.reshape(-1))
            second_size += first.numel()
        self.items: dict[int, tuple] = {}  # rank tile -> contract work items
        self.ranks = lowrank["rank"]
        self.lowrank = {key: index(values) for key, values in lowrank.items()}
        self.sources = {key: index(values) for key, values in sources.items()}
        empty = torch.zeros(1, dtype=dtype, device=device)
        self.first = torch.cat(firsts).to(device, dtype) if firsts else empty
        self.second = torch.cat(seconds).to(device, dtype) if seconds else empty
        self.z_stride = max(8, math.ceil(self.z_columns / 8) * 8)  # 16-byte aligned rows
        self._out_ranges = out_ranges
        self._tile_lists: dict[int, tuple] = {}

    def _contributions(self, out_tile: int) -> tuple:
        """Output tiles of ``out_tile`` columns -> the sources covering them: per tile the first index into
        (source, shift, low, high) lists; the tile's column j is column ``shift + j`` of the source's block
        output, used where it lies in ``[low, high)``."""
        if out_tile not in self._tile_lists:
            tiles = math.ceil(self.out_features / out_tile)
            per_tile: list[list[tuple[int, int, int, int]]] = [[] for _ in range(tiles)]
            for source, (out_start, h) in enumerate(self._out_ranges):
                local = 0
                for start, size in _split(out_start, h, self.out_features):
                    for tile in range(start // out_tile, (start + size - 1) // out_tile + 1):
                        per_tile[tile].append((source, tile * out_tile - start + local, local, local + size))
                    local += size
            flat = [c for tile in per_tile for c in tile] or [(0, 0, 0, 0)]
            first = [0]
            for tile in per_tile:
                first.append(first[-1] + len(tile))
            columns = [self._index(list(values)) for values in zip(*flat)]
            self._tile_lists[out_tile] = (tiles, self._index(first), *columns)
        return self._tile_lists[out_tile]

    def _index(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values or [0], dtype=torch.int32, device=self.device)

    def _items(self, rank_tile: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Contract work items: (block, first rank) for every ``rank_tile`` columns of every block."""
        if rank_tile not in self.items:
            pairs = [(b, r) for b, rank in enumerate(self.ranks) for r in range(0, rank, rank_tile)]
            self.items[rank_tile] = (self._index([p[0] for p in pairs]), self._index([p[1] for p in pairs]), len(pairs))
        return self.items[rank_tile]

    def run(self, x2: torch.Tensor, bias: torch.Tensor | None, tiles: Tiles | None = None) -> torch.Tensor:
        """``x2``: contiguous ``tokens x in_features`` on this layout's device and dtype."""
        tokens = x2.shape[0]
        tiles = tiles or default_tiles(self.dtype, tokens, self.ranks)
        most = 65535 * tiles.tokens  # CUDA's limit on the second grid dimension
        if tokens > most:
            return torch.cat([self.run(chunk, bias, tiles) for chunk in x2.split(most)])
        x2 = x2.contiguous()
        ieee = x2.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
        upcast = x2.dtype == torch.bfloat16 and x2.device.type == "cpu"  # only the interpreter runs on the CPU
        z = x2.new_empty(tokens, self.z_stride)
        token_blocks = triton.cdiv(tokens, tiles.tokens)
        blocks, ranks, count = self._items(tiles.rank)
        if count:
            lr = self.lowrank
            _contract_kernel[(count, token_blocks)](
                x2, self.first, z, blocks, ranks,
                lr["start1"], lr["size1"], lr["start2"], lr["size2"], lr["rank"], lr["z_col"], lr["offset"],
                tokens, self.in_features, self.z_stride,
                BLOCK_T=tiles.tokens, BLOCK_R=tiles.rank, BLOCK_K=tiles.k, IEEE=ieee, UPCAST=upcast,
                num_warps=tiles.warps, num_stages=tiles.stages,
            )
        y = x2.new_empty(tokens, self.out_features)
        s = self.sources
        out_tiles, tile_first, source, shift, low, high = self._contributions(tiles.out)
        _expand_kernel[(out_tiles, token_blocks)](
            x2, z, self.second, bias if bias is not None else y, y,
            tile_first, source, shift, low, high,
            s["is_z"], s["start"], s["size"], s["offset"], s["out_size"],
            tokens, self.in_features, self.out_features, self.z_stride,
            HAS_BIAS=bias is not None, BLOCK_T=tiles.tokens, BLOCK_N=tiles.out, BLOCK_K=tiles.k, IEEE=ieee,
            UPCAST=upcast,
            num_warps=tiles.warps, num_stages=tiles.stages,
        )
        return y
