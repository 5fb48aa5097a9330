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
    def _hint(value, ALIGNED: tl.constexpr):
        """Tell the compiler a runtime offset is a multiple of 16 (checked on the host), so loads vectorise."""
        if ALIGNED:
            value = tl.multiple_of(value, 16)
        return value

    @triton.jit
    def _contract_kernel(
        x_ptr, first_ptr, z_ptr,
        item_block_ptr, item_rank_ptr,
        in_start1_ptr, in_size1_ptr, in_start2_ptr, in_size2_ptr, rank_ptr, z_col_ptr, first_offset_ptr,
        tokens, in_features, z_stride,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    ):
        # Programs next to each other share a token tile (its rows of x stay in L2 across blocks).
        item = tl.program_id(0)
        block = tl.load(item_block_ptr + item)
        rank0 = _hint(tl.load(item_rank_ptr + item), ALIGNED)
        rank = _hint(tl.load(rank_ptr + block), ALIGNED)
        offset = _hint(tl.load(first_offset_ptr + block), ALIGNED)
        rows = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        ranks = rank0 + tl.arange(0, BLOCK_R)
        row_ok = rows[:, None] < tokens
        rank_ok = ranks[None, :] < rank
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        # The input range in at most two contiguous parts; `first` holds their rows one after the other.
        size1 = _hint(tl.load(in_size1_ptr + block), ALIGNED)
        for part in tl.static_range(2):
            row0 = size1 * part
            if part == 0:
                start = _hint(tl.load(in_start1_ptr + block), ALIGNED)
                size = size1
            else:
                start = _hint(tl.load(in_start2_ptr + block), ALIGNED)
                size = _hint(tl.load(in_size2_ptr + block), ALIGNED)
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
        z_col = _hint(tl.load(z_col_ptr + block), ALIGNED)
        tl.store(z_ptr + rows[:, None] * z_stride + (z_col + ranks)[None, :], acc.to(z_ptr.dtype.element_ty), mask=row_ok & rank_ok)

    @triton.jit
    def _expand_step(
        acc, source_ptr, source_stride, second_ptr, rows, row_ok, step,
        column_ptr, second_offset_ptr, out_size_ptr, k_size_ptr, shift_ptr, low_ptr, high_ptr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    ):
        """``acc += source[:, column : column + k] @ second[offset : offset + k rows, shift + (0..BLOCK_N)]``,
        the output columns masked to the block's part ``[low, high)``."""
        column = _hint(tl.load(column_ptr + step), ALIGNED)
        offset = _hint(tl.load(second_offset_ptr + step), ALIGNED)
        out_size = _hint(tl.load(out_size_ptr + step), ALIGNED)
        k_size = _hint(tl.load(k_size_ptr + step), ALIGNED)
        local = _hint(tl.load(shift_ptr + step), ALIGNED) + tl.arange(0, BLOCK_N)
        col_ok = (local >= _hint(tl.load(low_ptr + step), ALIGNED)) & (local < _hint(tl.load(high_ptr + step), ALIGNED))
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < k_size
        a = tl.load(source_ptr + rows[:, None] * source_stride + (column + ks)[None, :], mask=row_ok & k_ok[None, :], other=0.0)
        w = tl.load(second_ptr + offset + ks[:, None] * out_size + local[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        return acc

    @triton.jit
    def _expand_kernel(
        x_ptr, z_ptr, second_ptr, bias_ptr, y_ptr, bounds_ptr,
        column_ptr, second_offset_ptr, out_size_ptr, k_size_ptr, shift_ptr, low_ptr, high_ptr,
        tokens, in_features, out_features, z_stride,
        HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    ):
        tile = tl.program_id(0)
        rows = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows[:, None] < tokens
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        # One flat loop per source over (block, k-chunk) steps: nothing branches inside, so the compiler
        # can prefetch the next step's tiles across blocks.
        z_first, x_first, x_last = tl.load(bounds_ptr + 3 * tile), tl.load(bounds_ptr + 3 * tile + 1), tl.load(bounds_ptr + 3 * tile + 2)
        for step in range(z_first, x_first):
            acc = _expand_step(acc, z_ptr, z_stride, second_ptr, rows, row_ok, step, column_ptr, second_offset_ptr,
                               out_size_ptr, k_size_ptr, shift_ptr, low_ptr, high_ptr, BLOCK_N, BLOCK_K, IEEE, UPCAST, ALIGNED)
        for step in range(x_first, x_last):
            acc = _expand_step(acc, x_ptr, in_features, second_ptr, rows, row_ok, step, column_ptr, second_offset_ptr,
                               out_size_ptr, k_size_ptr, shift_ptr, low_ptr, high_ptr, BLOCK_N, BLOCK_K, IEEE, UPCAST, ALIGNED)
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
    """Tile sizes and launch settings of the two kernels."""

    tokens: int  # token rows per program (both kernels)
    rank: int  # rank columns per contract program
    out: int  # output columns per expand program
    k: int  # reduction step of the contract kernel
    k_out: int  # reduction step of the expand kernel
    warps: int = 4  # contract kernel
    warps_out: int = 4  # expand kernel
    stages: int = 3


def rank_tile(ranks: list[int]) -> int:
    """Rank columns per contract program: wide tiles reread the input less, narrow ones waste less on
    padding (a tile's input read counted as 32 rank columns of work)."""
    return min((16, 32, 64, 128), key=lambda tile: sum(math.ceil(r / tile) * (tile + 32) for r in ranks))


def default_tiles(dtype: torch.dtype, tokens: int, ranks: list[int]) -> Tiles:
    """Tile sizes that suit Hopper-class GPUs: wide tiles for many tokens, narrow ones for few."""
    columns = rank_tile(ranks)
    k_out = min(64, max(16, triton.next_power_of_2(min(ranks, default=16))))  # a rank-32 block: one step
    if dtype in (torch.bfloat16, torch.float16):
        if tokens >= 2048:
            return Tiles(128, columns, 128, 64, k_out, warps=4, warps_out=8)
        return Tiles(64, columns, 64, 64, k_out)
    return Tiles(128 if tokens >= 2048 else 64, columns, 64, 32, min(k_out, 32))


def _multiples_of_16(*lists) -> bool:
    return all(value % 16 == 0 for values in lists for value in values)


class KernelLayout:
    """The blocks of one compact layer packed for the two kernels, on one device and dtype.

    ``blocks``: ``(in_parts, out_parts, first, second)`` per merged block as :class:`gblr.compact._Slice`
    holds them (parts are ``(start, stop, first, last)`` feature ranges with their offset inside the
    block; ``first`` is ``w x R`` (low-rank) or ``w x h`` (dense), ``second`` ``R x h`` or None).
    """

    def __init__(self, blocks, in_features: int, out_features: int, device, dtype) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.device = dtype, device
        firsts, seconds = [], []
        first_size = second_size = 0
        lowrank = {"start1": [], "size1": [], "start2": [], "size2": [], "rank": [], "z_col": [], "offset": []}
        # Sources of the expand kernel: (reads z, first column, columns, offset in `second`, output
        # start, output size): a low-rank block's columns of z, or one contiguous input part of a dense block.
        self._sources: list[tuple[bool, int, int, int, int, int]] = []
        self.z_columns = 0
        for in_parts, out_parts, first, second in blocks:
            h = sum(b - a for a, b, _, _ in out_parts)
            out_start = out_parts[0][0]
            if second is not None:
                (start1, size1), (start2, size2) = ([(a, b - a) for a, b, _, _ in in_parts] + [(0, 0)])[:2]
                rank = first.shape[1]
                for key, value in zip(lowrank, (start1, size1, start2, size2, rank, self.z_columns, first_size)):
                    lowrank[key].append(value)
                firsts.append(first.reshape(-1))
                first_size += first.numel()
                self._sources.append((True, self.z_columns, rank, second_size, out_start, h))
                seconds.append(second.reshape(-1))
                second_size += second.numel()
                self.z_columns += rank
                continue
            for a, b, fa, _ in in_parts:  # a dense block: one source per contiguous input part
                self._sources.append((False, a, b - a, second_size + fa * h, out_start, h))
            seconds.append(first.reshape(-1))
            second_size += first.numel()
        self.ranks = lowrank["rank"]
        self.lowrank = {key: self._index(values) for key, values in lowrank.items()}
        self.z_stride = max(16, math.ceil(self.z_columns / 16) * 16)
        self._contract_aligned = _multiples_of_16(*lowrank.values(), [in_features, out_features, self.z_stride])
        empty = torch.zeros(1, dtype=dtype, device=device)
        self.first = torch.cat(firsts).to(device, dtype) if firsts else empty
        self.second = torch.cat(seconds).to(device, dtype) if seconds else empty
        self._items: dict[int, tuple] = {}
        self._steps: dict[tuple[int, int], tuple] = {}

    def _index(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values or [0], dtype=torch.int32, device=self.device)

    def items(self, rank_tile: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Contract work items: (block, first rank) for every ``rank_tile`` columns of every block."""
        if rank_tile not in self._items:
            pairs = [(b, r) for b, rank in enumerate(self.ranks) for r in range(0, rank, rank_tile)]
            self._items[rank_tile] = (self._index([p[0] for p in pairs]), self._index([p[1] for p in pairs]), len(pairs))
        return self._items[rank_tile]

    def steps(self, out_tile: int, k_step: int) -> tuple:
        """Expand work: per output tile of ``out_tile`` columns, its steps reading z then those reading x
        (``bounds[3 t : 3 t + 3]``); a step multiplies ``k_step`` columns of one source into the tile:
        (source column, offset in `second`, block output size, columns, shift, low, high), where the
        tile's column j is column ``shift + j`` of the block's output, used where in ``[low, high)``."""
        key = (out_tile, k_step)
        if key not in self._steps:
            tiles = math.ceil(self.out_features / out_tile)
            per_tile = [([], []) for _ in range(tiles)]
            for reads_z, column, size, offset, out_start, h in self._sources:
                local = 0
                for start, part in _split(out_start, h, self.out_features):
                    for tile in range(start // out_tile, (start + part - 1) // out_tile + 1):
                        shift = tile * out_tile - start + local
                        for k in range(0, size, k_step):
                            step = (column + k, offset + k * h, h, min(k_step, size - k), shift, local, local + part)
                            per_tile[tile][0 if reads_z else 1].append(step)
                    local += part
            flat, bounds = [], []
            for z_steps, x_steps in per_tile:
                bounds += [len(flat), len(flat) + len(z_steps), len(flat) + len(z_steps) + len(x_steps)]
                flat += z_steps + x_steps
            fields = [list(values) for values in zip(*flat)] if flat else [[] for _ in range(7)]
            aligned = self._contract_aligned and _multiples_of_16(*fields)
            self._steps[key] = (tiles, self._index(bounds), [self._index(f) for f in fields], aligned)
        return self._steps[key]

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
        out_tiles, bounds, fields, aligned = self.steps(tiles.out, tiles.k_out)
        z = x2.new_empty(tokens, self.z_stride)
        token_blocks = triton.cdiv(tokens, tiles.tokens)
        blocks, ranks, count = self.items(tiles.rank)
        if count:
            lr = self.lowrank
            _contract_kernel[(count, token_blocks)](
                x2, self.first, z, blocks, ranks,
                lr["start1"], lr["size1"], lr["start2"], lr["size2"], lr["rank"], lr["z_col"], lr["offset"],
                tokens, self.in_features, self.z_stride,
                BLOCK_T=tiles.tokens, BLOCK_R=tiles.rank, BLOCK_K=tiles.k, IEEE=ieee, UPCAST=upcast,
                ALIGNED=self._contract_aligned, num_warps=tiles.warps, num_stages=tiles.stages,
            )
        y = x2.new_empty(tokens, self.out_features)
        _expand_kernel[(out_tiles, token_blocks)](
            x2, z, self.second, bias if bias is not None else y, y, bounds, *fields,
            tokens, self.in_features, self.out_features, self.z_stride,
            HAS_BIAS=bias is not None, BLOCK_T=tiles.tokens, BLOCK_N=tiles.out, BLOCK_K=tiles.k_out, IEEE=ieee,
            UPCAST=upcast, ALIGNED=aligned, num_warps=tiles.warps_out, num_stages=tiles.stages,
        )
        return y
