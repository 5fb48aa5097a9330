"""The compact GBLR form as two Triton launches per layer, whatever the number of blocks.

A compact layer is a list of merged blocks: block ``b`` reads a (cyclic) column range of the input and
adds into a (cyclic) column range of the output, through two factors (``x[:, in] @ first @ second``) or
one dense matrix (``x[:, in] @ first``). The generic executions in :mod:`gblr.compact` launch one or
more matmuls per block, which on a GPU costs more in launches and in strided accumulation than the
block products themselves. Here both steps are one *gathered matmul* each:

1. **contract**: ``z[:, b] = x[:, in_b] @ first_b`` for every low-rank block, the rank-``R_b`` results
   side by side in one ``tokens x sum(R_b)`` buffer;
2. **expand**: ``y = sum_b z[:, b] @ second_b`` over the low-rank blocks plus ``x[:, in_b] @ first_b``
   over the dense ones, and the bias.

A gathered matmul computes its output in column tiles. The rows of every factor that reach a tile are
packed, once per tile width, into one dense ``K_t x tile`` matrix (zero where a block does not cover a
column; rows that read the same source column merged into one) beside the list of the ``K_t`` source
columns they multiply. A tile is then one plain GEMM loop over ``K_t`` whose only irregularity is a
column gather: no per-block branches or masks, reduction steps long enough for tensor cores, and the
tile is written once (no atomics, no zero-fill, no read-modify-write of the output).

Products accumulate in float32; float32 inputs multiply in IEEE float32 unless
``torch.backends.cuda.matmul.allow_tf32`` is set (the same rule ``nn.Linear`` follows).

Runs on CUDA, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the generic executions need no Triton
    triton = None

__all__ = ["available", "unavailable_reason", "KernelLayout", "nearest_count"]


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` here."""
    return unavailable_reason(device) is None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` here, or None when they can."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return "the kernels need a CUDA device, or TRITON_INTERPRET=1 for Triton's interpreter on the CPU"
    if not _interpreter_runs_loops():
        import numpy

        return (f"Triton {triton.__version__}'s interpreter cannot run the kernels' loops with NumPy "
                f"{numpy.__version__} (it needs Triton 3.7 or newer, or NumPy before 2.4)")
    return None


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version such as "3.7.0+git1a2b" or "2.4.0rc1"."""
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _interpreter_runs_loops() -> bool:
    """Whether Triton's interpreter can run the kernels' loops: before Triton 3.7 it turns a loaded loop
    bound (a one-element array) into an int in a way NumPy 2.4 and newer refuse."""
    import numpy

    return _release(triton.__version__) >= (3, 7) or _release(numpy.__version__) < (2, 4)


if triton is not None:

    @triton.jit
    def _gathered_product(
        acc, source_ptr, source_stride, index_ptr, packed_ptr, rows, row_ok, first_row, count,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, RUNS: tl.constexpr,
    ):
        """``acc += source[rows, index[first_row + k]] @ packed[first_row + k]`` over ``k < count``, a
        multiple of BLOCK_K. No load is masked along k: a mask there makes Triton give up both vector
        loads and the software pipeline (checked in the sm_90 code it generates)."""
        cols = tl.arange(0, BLOCK_N)
        for k in range(0, count, BLOCK_K):
            packed_rows = first_row + k + tl.arange(0, BLOCK_K)
            columns = tl.load(index_ptr + packed_rows)
            if RUNS:  # runs of 16 consecutive columns, each starting at a multiple of 16 (made so on the host)
                columns = tl.max_contiguous(tl.multiple_of(columns, 16), 16)
            a = tl.load(source_ptr + rows[:, None] * source_stride + columns[None, :], mask=row_ok, other=0.0)
            w = tl.load(packed_ptr + packed_rows[:, None] * BLOCK_N + cols[None, :])
            if UPCAST:  # Triton's interpreter multiplies bfloat16 tiles wrongly
                a, w = a.to(tl.float32), w.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        return acc

    @triton.jit
    def _gathered_matmul_kernel(
        first_source_ptr, first_stride, second_source_ptr, second_stride, index_ptr, packed_ptr, bounds_ptr,
        bias_ptr, out_ptr, tokens, out_width,
        HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr, FIRST_RUNS: tl.constexpr, SECOND_RUNS: tl.constexpr,
    ):
        # Programs next to each other share a token tile (its rows of the sources stay in L2 across tiles).
        tile = tl.program_id(0)
        rows = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        row_ok = rows[:, None] < tokens
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        # The tile's packed rows: first those that read the first source, then those of the second; every
        # count is a multiple of BLOCK_K.
        first_row = tl.multiple_of(tl.load(bounds_ptr + 3 * tile), BLOCK_K)
        first_count = tl.load(bounds_ptr + 3 * tile + 1)
        second_count = tl.load(bounds_ptr + 3 * tile + 2)
        acc = _gathered_product(acc, first_source_ptr, first_stride, index_ptr, packed_ptr, rows, row_ok,
                                first_row, first_count, BLOCK_N, BLOCK_K, IEEE, UPCAST, FIRST_RUNS)
        acc = _gathered_product(acc, second_source_ptr, second_stride, index_ptr, packed_ptr, rows, row_ok,
                                tl.multiple_of(first_row + first_count, BLOCK_K), second_count,
                                BLOCK_N, BLOCK_K, IEEE, UPCAST, SECOND_RUNS)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_in = cols < out_width
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * out_width + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok & col_in[None, :])

    # Under TRITON_INTERPRET=1 (tests on the CPU) triton.jit gives an interpreted function.
    _INTERPRETED = not hasattr(_gathered_matmul_kernel, "device_caches")


def nearest_count(counts, tokens: int) -> tuple[int | None, float]:
    """The count among ``counts`` nearest to ``tokens`` on a log scale, and that distance (None and inf
    without counts). A plain loop: torch.compile traces it, not ``min(..., key=...)``."""
    nearest, nearest_distance = None, math.inf
    for count in counts:
        distance = abs(math.log(count) - math.log(tokens))
        if distance < nearest_distance:
            nearest, nearest_distance = count, distance
    return nearest, nearest_distance


def _split(start: int, size: int, length: int) -> list[tuple[int, int]]:
    """A cyclic range as (start, size) contiguous parts."""
    first = min(size, length - start)
    return [(start, first)] + ([(0, size - first)] if size > first else [])


def _runs_of_16(index: torch.Tensor) -> bool:
    """Whether ``index`` is made of runs of 16 consecutive values, each starting at a multiple of 16."""
    if index.numel() % 16:
        return False
    runs = index.view(-1, 16)
    return bool((runs[:, 0] % 16 == 0).all() and (runs == runs[:, :1] + torch.arange(16)).all())


class Tiles(NamedTuple):
    """Tile sizes and launch settings of the two kernels. (A named tuple, not a frozen dataclass: a
    compiled call may make one, and under torch.compile of torch 2.11 a frozen dataclass made inside the
    compiled region came out without its fields.)"""

    tokens: int  # token rows per program (both kernels)
    rank: int  # columns of z per contract program
    out: int  # output columns per expand program
    k: int  # reduction step of the contract kernel
    k_out: int  # reduction step of the expand kernel
    warps: int = 4  # contract kernel
    warps_out: int = 4  # expand kernel
    stages: int = 5  # fewer leave the gathered loop without copies in flight (see default_tiles)


def default_tiles(dtype: torch.dtype, tokens: int, rank_tile: int) -> Tiles:
    """Tile sizes that suit Hopper-class GPUs: wide tiles for many tokens, narrow ones for few. Reduction
    steps of 32: hardware-aware blocks come in multiples of 32 rows, which steps of 64 would pad with
    zero rows (a quarter more work on the layers benchmarks/compact_speed.py builds). Deep pipelines: a
    gathered load costs Triton's pipeliner stages (its column list is fetched a stage earlier), so 3-4
    stages compile to two buffers and a wait for every copy at each step; 5 keep one step in flight, 7
    two (checked in the generated sm_90 code). float32 multiplies slowly enough (no tensor cores in IEEE
    float32) that one step ahead hides the loads."""
    if dtype in (torch.bfloat16, torch.float16):
        if tokens >= 2048:
            return Tiles(128, rank_tile, 128, 32, 32, warps=4, warps_out=8, stages=7)
        return Tiles(64, rank_tile, 64, 32, 32, stages=7)
    return Tiles(128 if tokens >= 2048 else 64, rank_tile, 64, 32, 32, stages=5)


def tile_candidates(dtype: torch.dtype, tokens: int, rank_tile: int) -> tuple[Tiles, ...]:
    """What calibration times on the machine, the default first. From 2048 tokens on, where the tiles
    decide the speed (below, launches dominate), alternatives too: the best tiles depend on the GPU (its
    shared memory, how many programs fill it) and on the layer more than reasoning can settle. They trade
    output-tile width (z reread per tile against programs in flight) and token rows."""
    default = default_tiles(dtype, tokens, rank_tile)
    if tokens < 2048:
        return (default,)
    if dtype in (torch.bfloat16, torch.float16):
        others = (Tiles(128, rank_tile, 64, 32, 32, warps=4, warps_out=4, stages=7),
                  Tiles(64, rank_tile, 128, 32, 32, warps=4, warps_out=4, stages=7),
                  Tiles(128, rank_tile, 256, 32, 32, warps=4, warps_out=8, stages=7))
    else:
        others = (Tiles(64, rank_tile, 64, 32, 32, stages=5),
                  Tiles(128, rank_tile, 128, 32, 32, warps=4, warps_out=8, stages=5))
    # Contract tiles twice as wide: fewer rereads of the input, if reads cost more than _best_rank_tile assumes.
    wider = (default._replace(rank=2 * rank_tile),) if rank_tile < 128 else ()
    return (default,) + others + wider


# A source of a gathered matmul: (which source, its columns that are read, the rows they multiply (one per
# column, h wide), the first output column it adds into (h columns from there, cyclic)).
_Source = tuple[int, torch.Tensor, torch.Tensor, int]


@dataclass(frozen=True)
class _Plan:
    """One gathered matmul's work for one tile width and reduction step: tile ``t`` owns rows
    ``bounds[3t]`` onwards of ``packed`` (``tile`` wide): ``bounds[3t+1]`` rows that read columns
    ``index[row]`` of the first source, then ``bounds[3t+2]`` rows that read the second. Every count is
    a multiple of the reduction step (zero rows fill up)."""

    tiles: int
    bounds: torch.Tensor  # (3 * tiles,) int32
    index: torch.Tensor  # (rows,) int32
    packed: torch.Tensor  # (rows, tile)
    runs: tuple[bool, bool]  # per source: `index` made of runs of 16 consecutive columns from multiples of 16


def _tiles_reached(start: int, size: int, length: int, tile: int):
    """(tile, first and last output column inside it, offset of that column in the range) for every tile
    that the cyclic output range ``start, size`` reaches."""
    local = 0
    for part_start, part_size in _split(start, size, length):
        for t in range(part_start // tile, (part_start + part_size - 1) // tile + 1):
            low, high = max(part_start, t * tile), min(part_start + part_size, (t + 1) * tile)
            yield t, low - t * tile, high - t * tile, local + low - part_start
        local += part_size


def _whole_runs(columns: torch.Tensor) -> torch.Tensor:
    """Every run of 16 columns (from a multiple of 16) that holds one of ``columns``."""
    return (torch.unique(columns // 16)[:, None] * 16 + torch.arange(16)).flatten()


def _merged(parts: list[tuple[torch.Tensor, torch.Tensor]], tile: int) -> tuple[torch.Tensor, ...]:
    """The distinct columns one tile reads from one source, one packed row per column (rows that read
    the same column add up), and the whole runs of 16 columns that hold them."""
    columns, inverse = torch.unique(torch.cat([c for c, _ in parts]), return_inverse=True)
    rows = parts[0][1].new_zeros(len(columns), tile).index_add_(0, inverse, torch.cat([p for _, p in parts]))
    return columns, rows, _whole_runs(columns)


def _plan(sources: list[_Source], length: int, tile: int, block_k: int, source_widths: tuple[int, int],
          device, dtype) -> _Plan:
    per_tile = [([], []) for _ in range(math.ceil(length / tile))]  # (columns, rows over the tile) per source
    for which, columns, rows, out_start in sources:
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        covered: dict[int, torch.Tensor] = {}
        for t, low, high, offset in _tiles_reached(out_start, rows.shape[1], length, tile):
            part = covered.setdefault(t, rows.new_zeros(len(columns), tile))
            part[:, low:high] = rows[:, offset : offset + high - low]
        for t, part in covered.items():
            per_tile[t][which].append((columns, part))
    merged = [[_merged(parts, tile) if parts else None for parts in per_source] for per_source in per_tile]
    # A source's gathers read whole aligned runs of 16 columns (vector loads; without them every element
    # is a load of its own) unless that would more than double what it reads.
    in_runs = []
    for which, width in enumerate(source_widths):
        used = [m[which] for m in merged if m[which] is not None]
        whole = sum(len(runs) for _, _, runs in used)
        in_runs.append(width % 16 == 0 and block_k % 16 == 0 and whole <= 2 * sum(len(c) for c, _, _ in used))
    bounds, index, packed = [], [], []  # index: (which source, columns) in the packed rows' order
    for per_source in merged:
        bounds.append(sum(bounds[-3:]))  # the previous tile's first row and its two counts
        for which, segment in enumerate(per_source):
            if segment is None:
                bounds.append(0)
                continue
            columns, rows, whole = segment
            if in_runs[which]:
                rows = rows.new_zeros(len(whole), tile).index_copy_(0, torch.searchsorted(whole, columns), rows)
                columns = whole
            # Zero rows fill up to a multiple of block_k, reading columns 0-15 (real values times zero,
            # as a dense product does): nothing is masked along the reduction.
            fill = -len(columns) % block_k
            index.append((which, torch.cat([columns, torch.arange(fill) % (16 if in_runs[which] else 1)])))
            packed += [rows, rows.new_zeros(fill, tile)]
            bounds.append(len(columns) + fill)
    runs = tuple(ok and _runs_of_16(torch.cat([c for w, c in index if w == which] + [torch.zeros(0, dtype=torch.long)]))
                 for which, ok in enumerate(in_runs))
    flat = torch.cat([c for _, c in index]).int() if index else torch.zeros(block_k, dtype=torch.int32)
    packed = torch.cat(packed) if packed else torch.zeros(block_k, tile)
    return _Plan(len(per_tile), torch.tensor(bounds or [0], dtype=torch.int32, device=device), flat.to(device),
                 packed.to(device, dtype).contiguous(), runs)


class _Step:
    """One launch of the gathered matmul, as every call with as many token tiles makes it: ``out =
    first[:, ...] @ packed + second[:, ...] @ packed (+ bias)`` as ``plan`` lays it out. Everything a
    call does not change is fixed here once: a call's host time matters (a small product takes
    microseconds on a GPU)."""

    def __init__(self, plan: _Plan, token_tiles: int, constants: tuple, warps: int, stages: int, out_width: int):
        self.plan, self.grid, self.constants = plan, (plan.tiles, token_tiles, 1), constants
        self.warps, self.stages = warps, stages
        self.out_width = out_width  # columns of the output (z's: whole contract tiles, padded to a multiple of 16)
        written = plan.tiles * constants[2]
        self.unwritten = written if out_width > written else None  # z's columns past the last tile
        # The kernels Triton compiled for this launch, keyed by what varies between calls (_launch).
        self.kernels: dict[tuple, object] = {}

    def launch(self, first, second, bias, tokens: int, rows: tuple) -> torch.Tensor:
        """``first`` and ``second``: contiguous, ``tokens`` rows (of any leading shape); the output has
        leading shape ``rows``."""
        out = first.new_empty(*rows, self.out_width)
        if self.unwritten is not None:  # the expand may read them
            out[..., self.unwritten :] = 0
        plan = self.plan
        _launch(self.kernels, self.grid, (first, first.shape[-1], second, second.shape[-1], plan.index, plan.packed,
                                          plan.bounds, out if bias is None else bias, out, tokens, self.out_width),
                self.constants, self.warps, self.stages)
        return out


_CONSTANTS = ("HAS_BIAS", "BLOCK_T", "BLOCK_N", "BLOCK_K", "IEEE", "UPCAST", "FIRST_RUNS", "SECOND_RUNS")
# False once a direct launch has been found to write something else than Triton's own (see _launch).
_direct_launch = True


def _launch(kernels: dict, grid: tuple[int, int, int], args: tuple, constants: tuple, warps: int, stages: int) -> None:
    """Launch the gathered-matmul kernel. Triton's own launch binds and specialises every argument again
    on each call, about 10 us of host time (Triton 3.6), as long as the kernel itself takes at a few
    thousand tokens. So the compiled kernel that launch returns is kept in ``kernels`` (one launch's:
    the same constants, dtype, device and widths every time) keyed by what Triton specialises on among
    what varies (the inputs' 16-byte alignment, the token count's divisibility by 16 and equality to 1)
    and launched directly next time (:func:`_direct`). The first time, the direct launch is checked to
    write bit for bit what Triton's did."""
    first, second, bias_or_out, tokens = args[0], args[2], args[7], args[9]
    key = None
    if _direct_launch and not torch.compiler.is_compiling():  # torch.compile traces Triton's own launch
        key = (first.data_ptr() % 16 == 0, second.data_ptr() % 16 == 0, bias_or_out.data_ptr() % 16 == 0,
               tokens % 16 == 0, tokens == 1)
        launch = kernels.get(key)
        if launch is not None:
            launch(grid, (*args, *constants))
            return
    compiled = _gathered_matmul_kernel[grid](*args, **dict(zip(_CONSTANTS, constants)), num_warps=warps,
                                             num_stages=stages)
    if key is not None and hasattr(compiled, "packed_metadata"):  # (the interpreter returns no compiled kernel)
        if not (first.is_cuda and torch.cuda.is_current_stream_capturing()):  # the check reads the outputs
            launch = _direct(compiled)
            if _launches_the_same(launch, grid, args, constants):
                kernels[key] = launch


def _direct(compiled):
    """``launch(grid, args)``: what ``compiled[grid](*args)`` does, without the closure, argument repacking
    and launch metadata Triton's ``CompiledKernel.__getitem__`` makes on every call (about 1.2 of the 1.7
    us it takes on the stand-in GPU). The metadata is only read by a profiler's launch hook: while one is
    registered, Triton's own path is taken."""
    try:
        run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
        active, hooks = triton.runtime.driver.active, triton.knobs.runtime
        current_stream, current_device = active.get_current_stream, active.get_current_device
    except AttributeError:  # another Triton: its own launch of the compiled kernel
        return lambda grid, args: compiled[grid](*args)

    def launch(grid, args):
        enter = hooks.launch_enter_hook
        if enter is not None and getattr(enter, "calls", True):  # (a chain of hooks, or one hook)
            compiled[grid](*args)
        else:
            run(grid[0], grid[1], grid[2], current_stream(current_device()), function, metadata, None, enter,
                hooks.launch_exit_hook, *args)
    return launch


def _launches_the_same(launch, grid: tuple[int, int, int], args: tuple, constants: tuple) -> bool:
    """Whether ``launch`` (a direct launch) writes what Triton's launch just wrote into ``args[8]`` (on its
    first 256 token rows at most: a copy of a large output could exhaust the GPU's memory); if not,
    direct launches are turned off for the process."""
    global _direct_launch
    tokens = min(args[9], 256)  # as the key was made: a multiple of 16, or 1, if the count was
    out = args[8].view(-1, args[10])[:tokens]
    again = out.clone()  # what the kernel does not write (z's padding columns) stays as it is,
    again[:, : grid[0] * constants[2]] = float("nan")  # what it writes (its tiles of BLOCK_N columns) must come back
    try:
        launch((grid[0], -(-tokens // constants[1]), 1), (*args[:8], again, tokens, *args[10:], *constants))
        same = torch.equal(again.view(torch.uint8), out.view(torch.uint8))  # bits: NaN included
    except Exception:  # noqa: BLE001 - a Triton whose compiled kernels take other arguments
        same = False
    _direct_launch = _direct_launch and same
    return same


class KernelLayout:
    """The blocks of one compact layer packed for the two kernels, on one device and dtype.

    ``blocks``: ``(in_parts, out_parts, first, second)`` per merged block as :class:`gblr.compact._Slice`
    holds them (parts are ``(start, stop, first, last)`` feature ranges with their offset inside the
    block; ``first`` is ``w x R`` (low-rank) or ``w x h`` (dense), ``second`` ``R x h`` or None).
    """

    def __init__(self, blocks, in_features: int, out_features: int, device, dtype) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.device = dtype, device
        # Low-rank blocks in the order of their inputs, so blocks that share a contract tile overlap.
        blocks = sorted(blocks, key=lambda block: (block[3] is None, block[0][0][0]))
        self._contract: list[_Source] = []
        self._expand: list[_Source] = []
        self.z_columns = 0
        for in_parts, out_parts, first, second in blocks:
            columns = torch.cat([torch.arange(a, b) for a, b, _, _ in in_parts])  # `first`'s rows in order
            first = first.detach().cpu()
            if second is None:  # a dense block: x straight into the output
                self._expand.append((1, columns, first, out_parts[0][0]))
                continue
            rank = first.shape[1]
            self._contract.append((0, columns, first, self.z_columns))
            z_columns = torch.arange(self.z_columns, self.z_columns + rank)
            self._expand.append((0, z_columns, second.detach().cpu(), out_parts[0][0]))
            self.z_columns += rank
        self.rank_tile = self._best_rank_tile()
        self._plans: dict[tuple[str, int, int], _Plan] = {}
        self._measured: dict[int, Tiles] = {}  # token count -> tiles that ran fastest there (use_tiles)
        # token count -> tiles a call with that many tokens runs, and (token tiles, tiles, bias, IEEE float32)
        # -> the steps it launches: a call's host time matters (a small product takes microseconds on a GPU)
        self._tiles: dict[int, Tiles] = {}
        self._steps: dict[tuple, tuple[_Step | None, _Step]] = {}

    def use_tiles(self, tokens: int, tiles: Tiles) -> None:
        """Run ``tiles`` at ``tokens`` tokens and at counts nearer to it than to any other such count
        (within a factor 2; beyond, :func:`default_tiles`)."""
        self._measured[tokens] = tiles
        self._tiles.clear()

    def tiles_for(self, tokens: int) -> Tiles:
        """The tiles a call with ``tokens`` tokens runs."""
        tiles = self._tiles.get(tokens)
        if tiles is None:
            nearest, distance = nearest_count(self._measured, max(tokens, 1))
            if distance <= math.log(2):
                tiles = self._measured[nearest]
            else:
                tiles = default_tiles(self.dtype, tokens, self.rank_tile)
            self._tiles[tokens] = tiles
        return tiles

    def _best_rank_tile(self) -> int:
        """Columns of z per contract program: wide tiles reread the input less, narrow ones multiply fewer
        zeros. A packed row costs the tile's width in products plus a read of its input column, which
        takes a GPU about as long as 16 products per token at tensor-core rates (L2 delivers tens of
        values per cycle where the tensor cores multiply about a thousand)."""
        def cost(tile: int) -> int:
            reached: dict[int, list[torch.Tensor]] = {}
            for _, columns, first, start in self._contract:
                for t, *_ in _tiles_reached(start, first.shape[1], self.z_columns, tile):
                    reached.setdefault(t, []).append(columns)
            return sum((tile + 16) * len(torch.cat(c).unique()) for c in reached.values())
        return min((16, 32, 64, 128), key=cost)

    def plan(self, step: str, tile: int, block_k: int) -> _Plan:
        """The packed work of ``step`` ("contract" or "expand") for tiles ``tile`` columns wide and
        reduction steps of ``block_k`` (made once)."""
        key = (step, tile, block_k)
        if key not in self._plans:
            if step == "contract":
                self._plans[key] = _plan(self._contract, self.z_columns, tile, block_k, (self.in_features, 0),
                                         self.device, self.dtype)
            else:
                self._plans[key] = _plan(self._expand, self.out_features, tile, block_k,
                                         (self.z_width(16), self.in_features), self.device, self.dtype)
        return self._plans[key]

    def z_width(self, rank_tile: int) -> int:
        """Columns of z: whole contract tiles, padded to a multiple of 16 for aligned rows."""
        return math.ceil(math.ceil(self.z_columns / rank_tile) * rank_tile / 16) * 16

    def _steps_for(self, tokens: int, tiles: Tiles, bias: bool) -> tuple[_Step | None, _Step]:
        """The contract (None without low-rank blocks) and expand launches of a call (made once per kind)."""
        ieee = self.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32  # as nn.Linear multiplies
        token_tiles = -(-tokens // tiles.tokens)  # (not triton.cdiv: a jit function, slow from the host)
        key = (token_tiles, tiles, bias, ieee)
        steps = self._steps.get(key)
        if steps is None:
            upcast = self.dtype == torch.bfloat16 and _INTERPRETED
            contract = None
            if self.z_columns:
                plan = self.plan("contract", tiles.rank, tiles.k)
                contract = _Step(plan, token_tiles,
                                 (False, tiles.tokens, tiles.rank, tiles.k, ieee, upcast, *plan.runs),
                                 tiles.warps, tiles.stages, self.z_width(tiles.rank))
            plan = self.plan("expand", tiles.out, tiles.k_out)
            expand = _Step(plan, token_tiles,
                           (bias, tiles.tokens, tiles.out, tiles.k_out, ieee, upcast, *plan.runs),
                           tiles.warps_out, tiles.stages, self.out_features)
            steps = self._steps[key] = (contract, expand)
        return steps

    def contract(self, x2: torch.Tensor, tiles: Tiles) -> torch.Tensor:
        """z: ``x2[:, in_b] @ first_b`` of every low-rank block side by side (``x2`` where there are none)."""
        tokens = x2.shape[0]
        return self._contracted(x2, self._steps_for(tokens, tiles, False)[0], tokens)

    @staticmethod
    def _contracted(x: torch.Tensor, step: _Step | None, tokens: int) -> torch.Tensor:
        return x if step is None else step.launch(x, x, None, tokens, (tokens,))

    def run(self, x: torch.Tensor, bias: torch.Tensor | None, tiles: Tiles | None = None) -> torch.Tensor:
        """``x``: ``(..., in_features)`` on this layout's device and dtype; returns ``(..., out_features)``."""
        tokens = x.numel() // self.in_features
        tiles = tiles or self.tiles_for(tokens)
        most = 65535 * tiles.tokens  # CUDA's limit on the second grid dimension
        if tokens > most:
            parts = [self.run(chunk, bias, tiles) for chunk in x.reshape(-1, self.in_features).split(most)]
            return torch.cat(parts).view(*x.shape[:-1], self.out_features)
        contract, expand = self._steps_for(tokens, tiles, bias is not None)
        x = x.contiguous()  # (not a reshape to two dimensions: the kernels need only the rows' width)
        z = self._contracted(x, contract, tokens)
        return expand.launch(z, x, bias, tokens, x.shape[:-1])
