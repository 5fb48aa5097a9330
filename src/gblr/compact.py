"""Frozen compact inference form of GBLR layers: work proportional to the learned structure.

A trained :class:`GBLRLinear` in eval mode multiplies by its effective dense weight. Its compact form
computes the same thing block by block:

1. every active component is cropped to the exact support of its masked factors (its intervals, with
   wrap-around; for a finite sigma, the Gaudi tails that survive the hard mask are kept);
2. components with identical intervals are merged into one block of the summed rank;
3. a block whose dense ``h x w`` product is cheaper than its rank-``R`` factors is stored dense;
4. blocks are padded to multiples of ``align`` rows/columns and grouped by (kind, size, rank), each group
   runs as one batched matmul. Activations are kept transposed (features x tokens), so gathering a
   block's input rows and adding into its output rows touch contiguous memory.

Six executions compute the same result: ``"dense"`` (the effective weight), ``"factored"`` (two skinny
matmuls with the full-length masked factors of the active components), ``"blocks"`` (the batched
groups above), ``"slices"`` (one product per merged block, reading and accumulating into column
ranges of the untransposed activations in place: no gathers, no padding; best for few large blocks, as
the hardware-aware option learns), ``"grouped"`` (the low-rank blocks of each rank in two grouped
matmuls, ``torch._grouped_mm``, whatever their number and sizes: one gather of their input columns, one
scatter-add of their output rows) and, on CUDA with Triton, ``"kernel"`` (all blocks in two launches,
see :mod:`gblr.compact_kernel`; timed with a few tile sizes, the fastest kept). A layer times them on
this machine when it is built (:meth:`CompactGBLRLinear.calibrate`) and then runs, for each number of
tokens, the one that measured fastest at the nearest calibrated size (dense unless another is at least
10 % faster), so a layer that cannot gain keeps dense speed. A token count more than twice away from
every calibrated one (or the first call after a move to another device or dtype) is timed on first
use, so the plan covers the sizes the model really runs at.
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import compact_kernel
from .mask import shortest_cyclic_windows
from .structured.base import StructuredLinear
from .structured.gblr import GBLRLinear

__all__ = ["CompactGBLRLinear", "compact", "EXECUTIONS"]

EXECUTIONS = ("dense", "factored", "blocks", "slices", "grouped", "kernel")
#: Grouped matmuls need row strides and group boundaries on multiples of 16 bytes: sizes are padded to this.
GROUPED_ALIGN = 16
#: The "factored" execution's inner size is padded with zero components to a multiple of this: 16-bit GPU
#: matmuls with a leading dimension off 16 bytes leave the tensor-core kernels (on an H200, a bfloat16
#: low-rank layer of rank 61 ran 1.6x slower than dense, one of rank 184 2.2x faster).
FACTOR_ALIGN = 8
#: An execution more than 4x slower than dense is not timed again once measured at HOPELESS_FROM tokens or
#: more where dense takes HOPELESS_DENSE_SECONDS or more. Below either, launch overheads can hide what it
#: costs at scale: on a GPU a product of a few thousand tokens takes tens of microseconds, about the host
#: time of a few launches, so an execution of one launch per block looks hopeless there and wins later.
HOPELESS_FROM = 1024
HOPELESS_DENSE_SECONDS = 1e-4
#: Calibration times runs of up to MOST_CALLS_PER_SAMPLE calls lasting about SAMPLE_SECONDS (_median_seconds).
SAMPLE_SECONDS = 5e-4
MOST_CALLS_PER_SAMPLE = 16


@dataclass
class _BlockGroup:
    """Blocks of one padded size, run as one batched matmul."""

    out_index: torch.Tensor  # (blocks * rows,) output rows, padding -> dummy row `out_features`
    in_index: torch.Tensor  # (blocks * cols,) input rows, padding -> dummy zero row `in_features`
    first: torch.Tensor  # (blocks, R, cols) for low-rank, (blocks, rows, cols) for dense blocks
    second: torch.Tensor | None  # (blocks, rows, R) for low-rank, None for dense blocks
    rows: int
    cols: int

    @property
    def macs_per_token(self) -> int:
        blocks = self.first.shape[0]
        if self.second is None:
            return blocks * self.rows * self.cols
        return blocks * self.first.shape[1] * (self.rows + self.cols)


@dataclass
class _Slice:
    """One merged block, run on views of the input and output (no gathering): ``parts`` split an interval
    that wraps around into (start, stop) of the features and (start, stop) inside the block."""

    in_parts: list[tuple[int, int, int, int]]
    out_parts: list[tuple[int, int, int, int]]
    first: torch.Tensor  # (w, R) for low-rank blocks (x @ first), (w, h) for dense blocks
    second: torch.Tensor | None  # (R, h) for low-rank blocks, None for dense blocks

    @property
    def macs_per_token(self) -> int:
        w = self.first.shape[0]
        if self.second is None:
            return w * self.first.shape[1]
        return self.first.shape[1] * (w + self.second.shape[1])


@dataclass
class _RankGroup:
    """Low-rank blocks of one (padded) rank for the "grouped" execution: the input columns of all blocks
    in one gather, their factors stacked along the contraction (``first``) and output (``second``) sides,
    with each block's end offset on either side. Padding reads and writes a dummy feature."""

    in_index: torch.Tensor  # (sum of padded widths,) input features, padding -> in_features
    out_index: torch.Tensor  # (sum of padded heights,) output features, padding -> out_features
    in_offsets: torch.Tensor  # (blocks,) int32 end of each block's columns
    out_offsets: torch.Tensor  # (blocks,) int32 end of each block's rows
    first: torch.Tensor  # (sum of padded widths, rank)
    second: torch.Tensor  # (rank, sum of padded heights)

    @property
    def macs_per_token(self) -> int:
        return self.first.shape[1] * (self.first.shape[0] + self.second.shape[1])


def _add_dense_block(y: torch.Tensor, x2: torch.Tensor, piece: _Slice) -> None:
    """``y += x2 @ block`` on the block's column ranges of ``x2`` and ``y``, in place."""
    for a, b, fa, fb in piece.in_parts:
        for c, d, ga, gb in piece.out_parts:
            y[:, c:d].addmm_(x2[:, a:b], piece.first[fa:fb, ga:gb])


def _grouped_available(device: torch.device, dtype: torch.dtype, cache: dict = {}) -> bool:  # noqa: B006
    """Whether ``torch._grouped_mm`` runs here (CUDA supports it only on some GPUs and dtypes): one tiny
    trial per device and dtype, remembered."""
    key = (str(device), dtype)
    if key not in cache:
        cache[key] = False
        if hasattr(torch, "_grouped_mm"):
            try:
                a = torch.zeros(GROUPED_ALIGN, 2 * GROUPED_ALIGN, device=device, dtype=dtype)
                b = torch.zeros(2 * GROUPED_ALIGN, GROUPED_ALIGN, device=device, dtype=dtype)
                offsets = torch.tensor([GROUPED_ALIGN, 2 * GROUPED_ALIGN], device=device, dtype=torch.int32)
                inner = torch._grouped_mm(a, b, offs=offsets)  # (2, 16, 16)
                torch._grouped_mm(inner, a, offs=offsets)  # (16, 32)
                cache[key] = True
            except (RuntimeError, NotImplementedError):
                pass
    return cache[key]


def _median_seconds(call, count: int, synchronize) -> float:
    """Median over ``count`` samples of the time per call, each sample a run of calls between two
    synchronisations lasting about SAMPLE_SECONDS. On a GPU calls queue while earlier ones run, as in a
    model, so a run takes the longer of host and GPU time per call; timing lone calls would add the
    two and favour executions that spend little time on the host whatever their GPU time."""
    synchronize()
    start = time.perf_counter()
    call()
    synchronize()
    calls = max(1, min(MOST_CALLS_PER_SAMPLE, int(SAMPLE_SECONDS / max(time.perf_counter() - start, 1e-9))))
    samples = []
    for _ in range(count):
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def _parts(start: int, size: int, length: int) -> list[tuple[int, int, int, int]]:
    first = min(size, length - start)
    parts = [(start, start + first, 0, first)]
    if size > first:
        parts.append((0, size - first, first, size))
    return parts


def _padded(size: int, align: int) -> int:
    return size if size <= 1 else math.ceil(size / align) * align


def _aligned(size: int) -> int:
    return math.ceil(size / GROUPED_ALIGN) * GROUPED_ALIGN


def _cyclic_index(start: int, size: int, padded: int, length: int) -> torch.Tensor:
    index = (start + torch.arange(padded)) % length
    index[size:] = length  # the dummy row
    return index


class CompactGBLRLinear(StructuredLinear):
    """The frozen inference form of an eval-mode :class:`GBLRLinear` (see module docstring)."""

    family = "gblr-compact"
    executes_structure = True

    def __init__(self, layer: GBLRLinear, align: int = 8, chunk_tokens: int = 256, calibrate: bool = True) -> None:
        """``calibrate``: time the executions now and at new token counts on first use (False: choose by
        counted MACs)."""
        if not isinstance(layer, GBLRLinear):
            raise ValueError(f"layer must be a GBLRLinear, got {type(layer).__name__}")
        super().__init__(layer.in_features, layer.out_features)
        self.align = align
        self.required_gain = 0.9
        self.chunk_tokens = chunk_tokens
        with torch.no_grad():
            u, v = layer.masked_factors(hard=True)
            dtype = layer.out_factors.dtype
            k, r = layer.num_components, layer.rank
            u, v = u.reshape(k, r, self.out_features).double(), v.reshape(k, r, self.in_features).double()
            active = (u.abs().sum((1, 2)) > 0) & (v.abs().sum((1, 2)) > 0)
            u, v = u[active], v[active]
            self.register_buffer("weight", (u.reshape(-1, self.out_features).T @ v.reshape(-1, self.in_features)).to(dtype))
            inner = u.shape[0] * r
            padding = _padded(inner, FACTOR_ALIGN) - inner
            self.register_buffer("out_factor", F.pad(u.reshape(-1, self.out_features).T, (0, padding)).contiguous().to(dtype))
            self.register_buffer("in_factor", F.pad(v.reshape(-1, self.in_features), (0, 0, 0, padding)).contiguous().to(dtype))
            self.groups = self._build_groups(u, v, dtype)
            self.rank_groups = self._build_rank_groups(dtype)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        device = layer.out_factors.device
        self._apply(lambda t: t.to(device))  # the groups were assembled on the CPU
        # tokens -> execution; until calibrated, the cheapest by counted MACs.
        self.plan: dict[int, str] = {}
        self._choices: dict[int, str] = {}
        # Executions far slower than dense at a smaller token count (see HOPELESS_FROM): not timed again.
        self._hopeless: set[str] = set()
        self.calibrate_on_use = calibrate
        self._kernel_layout = None
        if calibrate:
            self.calibrate()

    # --- construction ----------------------------------------------------------------------------
    def _build_groups(self, u: torch.Tensor, v: torch.Tensor, dtype) -> list[_BlockGroup]:
        """Padded batched groups (the "blocks" execution); fills ``self.slices`` (the "slices" execution)."""
        m, n = self.out_features, self.in_features
        self.slices: list[_Slice] = []
        if u.shape[0] == 0:
            return []
        out_start, out_size = shortest_cyclic_windows(u.pow(2).sum(1))
        in_start, in_size = shortest_cyclic_windows(v.pow(2).sum(1))
        merged: dict[tuple[int, int, int, int], list[int]] = {}
        for i, key in enumerate(zip(out_start.tolist(), out_size.tolist(), in_start.tolist(), in_size.tolist())):
            merged.setdefault(key, []).append(i)
        grouped: dict[tuple, list] = {}
        for (r0, h, c0, w), members in merged.items():
            rows = (r0 + torch.arange(h)) % m
            cols = (c0 + torch.arange(w)) % n
            bu = u[members][:, :, rows].reshape(-1, h)  # (R, h)
            bv = v[members][:, :, cols].reshape(-1, w)  # (R, w)
            rank = bu.shape[0]
            hp, wp = _padded(h, self.align), _padded(w, self.align)
            dense_block = h * w <= rank * (h + w)
            self.slices.append(_Slice(
                _parts(c0, w, n), _parts(r0, h, m),
                ((bu.T @ bv).T if dense_block else bv.T).contiguous().to(dtype),
                None if dense_block else bu.contiguous().to(dtype),
            ))
            if dense_block:
                key = ("dense", hp, wp, 0)
                block = torch.zeros(hp, wp, dtype=torch.float64)
                block[:h, :w] = bu.T @ bv
                grouped.setdefault(key, []).append((r0, h, c0, w, block, None))
            else:
                rp = _padded(rank, self.align)
                key = ("lowrank", hp, wp, rp)
                first = torch.zeros(rp, wp, dtype=torch.float64)
                first[:rank, :w] = bv
                second = torch.zeros(hp, rp, dtype=torch.float64)
                second[:h, :rank] = bu.T
                grouped.setdefault(key, []).append((r0, h, c0, w, first, second))
        groups = []
        for (kind, hp, wp, _), blocks in sorted(grouped.items()):
            groups.append(
                _BlockGroup(
                    out_index=torch.cat([_cyclic_index(r0, h, hp, m) for r0, h, _, _, _, _ in blocks]),
                    in_index=torch.cat([_cyclic_index(c0, w, wp, n) for _, _, c0, w, _, _ in blocks]),
                    first=torch.stack([b[4] for b in blocks]).to(dtype),
                    second=None if kind == "dense" else torch.stack([b[5] for b in blocks]).to(dtype),
                    rows=hp,
                    cols=wp,
                )
            )
        return groups

    def _build_rank_groups(self, dtype) -> list[_RankGroup]:
        """The low-rank merged blocks (``self.slices``) grouped by rank padded to GROUPED_ALIGN, each block's
        width and height padded likewise (the "grouped" execution; dense blocks run as slices)."""
        m, n = self.out_features, self.in_features
        by_rank: dict[int, list[_Slice]] = {}
        for piece in self.slices:
            if piece.second is not None:
                by_rank.setdefault(_aligned(piece.first.shape[1]), []).append(piece)
        groups = []
        for rank, pieces in sorted(by_rank.items()):
            in_index, out_index, firsts, seconds = [], [], [], []
            for piece in pieces:
                w, h = piece.first.shape[0], piece.second.shape[1]
                wp, hp = _aligned(w), _aligned(h)
                start, end = piece.in_parts[0][0], piece.out_parts[0][0]
                in_index.append(_cyclic_index(start, w, wp, n))
                out_index.append(_cyclic_index(end, h, hp, m))
                first = torch.zeros(wp, rank, dtype=dtype)
                first[:w, : piece.first.shape[1]] = piece.first.cpu()
                second = torch.zeros(rank, hp, dtype=dtype)
                second[: piece.second.shape[0], :h] = piece.second.cpu()
                firsts.append(first)
                seconds.append(second)
            groups.append(_RankGroup(
                torch.cat(in_index), torch.cat(out_index),
                torch.tensor([len(i) for i in in_index], dtype=torch.int32).cumsum(0, dtype=torch.int32),
                torch.tensor([len(i) for i in out_index], dtype=torch.int32).cumsum(0, dtype=torch.int32),
                torch.cat(firsts), torch.cat(seconds, 1)))
        return groups

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for group in self.groups:  # plain tensors outside the module's buffers follow device/dtype moves
            group.first = fn(group.first)
            group.second = None if group.second is None else fn(group.second)
            group.out_index = group.out_index.to(self.weight.device)
            group.in_index = group.in_index.to(self.weight.device)
        for piece in self.slices:
            piece.first = fn(piece.first)
            piece.second = None if piece.second is None else fn(piece.second)
        device = self.weight.device
        for group in getattr(self, "rank_groups", []):  # absent while the constructor moves the blocks
            group.first, group.second = fn(group.first), fn(group.second)
            group.in_index, group.out_index = group.in_index.to(device), group.out_index.to(device)
            group.in_offsets, group.out_offsets = group.in_offsets.to(device), group.out_offsets.to(device)
        # Timings and the kernels' packed copy belong to the old device and dtype.
        self._kernel_layout = None
        self.plan, self._choices, self._hopeless = {}, {}, set()
        return self

    # --- cost ------------------------------------------------------------------------------------
    def macs_per_token(self) -> int:
        """MACs of the block execution, padding included (the work it really does)."""
        return sum(group.macs_per_token for group in self.groups)

    def execution_macs(self, execution: str) -> int:
        if execution == "dense":
            return self.in_features * self.out_features
        if execution == "factored":
            return self.in_factor.shape[0] * (self.in_features + self.out_features)
        if execution in ("slices", "kernel"):
            return sum(piece.macs_per_token for piece in self.slices)
        if execution == "grouped":
            return (sum(group.macs_per_token for group in self.rank_groups)
                    + sum(piece.macs_per_token for piece in self.slices if piece.second is None))
        return self.macs_per_token()

    def effective_parameters(self) -> int:
        return sum(g.first.numel() + (0 if g.second is None else g.second.numel()) for g in self.groups) + self._bias_size()

    def to_dense(self) -> torch.Tensor:
        return self.weight

    # --- execution -------------------------------------------------------------------------------
    def _dense(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2, self.weight, self.bias)

    def _factored(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x2, self.in_factor), self.out_factor, self.bias)

    def _blocks(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] > self.chunk_tokens:  # chunks keep a group's gathered inputs and outputs in cache
            return torch.cat([self._blocks(chunk) for chunk in x2.split(self.chunk_tokens)])
        tokens = x2.shape[0]
        # Features x tokens, with one zero row that padded block columns read.
        xt = torch.cat([x2.T, x2.new_zeros(1, tokens)])
        yt = x2.new_zeros(self.out_features + 1, tokens)
        for g in self.groups:
            blocks = g.first.shape[0]
            gathered = xt.index_select(0, g.in_index).view(blocks, g.cols, tokens)
            if g.second is None:
                out = torch.bmm(g.first, gathered)
            else:
                out = torch.bmm(g.second, torch.bmm(g.first, gathered))
            yt.index_add_(0, g.out_index, out.view(blocks * g.rows, tokens))
        y = yt[: self.out_features].T
        return y + self.bias if self.bias is not None else y

    def _slices(self, x2: torch.Tensor) -> torch.Tensor:
        # Every product reads a column range of x and accumulates into a column range of y in place:
        # BLAS takes the row stride of these views, so nothing is copied or gathered.
        y = x2.new_zeros(x2.shape[0], self.out_features) if self.bias is None else self.bias.expand(x2.shape[0], -1).clone()
        for piece in self.slices:
            if piece.second is None:
                _add_dense_block(y, x2, piece)
                continue
            a, b, fa, fb = piece.in_parts[0]
            z = x2[:, a:b] @ piece.first[fa:fb]
            for a, b, fa, fb in piece.in_parts[1:]:
                z.addmm_(x2[:, a:b], piece.first[fa:fb])
            for c, d, ga, gb in piece.out_parts:
                y[:, c:d].addmm_(z, piece.second[:, ga:gb])
        return y

    def _grouped(self, x2: torch.Tensor) -> torch.Tensor:
        tokens = x2.shape[0]
        # One zero column for padding to read and one spare output column for it to write.
        padded = torch.cat([x2, x2.new_zeros(tokens, 1)], 1)
        y = x2.new_zeros(tokens, self.out_features + 1)
        for group in self.rank_groups:
            inner = torch._grouped_mm(padded.index_select(1, group.in_index), group.first, offs=group.in_offsets)
            y.index_add_(1, group.out_index, torch._grouped_mm(inner, group.second, offs=group.out_offsets))
        y = y[:, : self.out_features]
        for piece in self.slices:
            if piece.second is None:
                _add_dense_block(y, x2, piece)
        return y + self.bias if self.bias is not None else y

    def _layout(self) -> compact_kernel.KernelLayout:
        """The blocks packed for the Triton kernels (made on first use)."""
        if self._kernel_layout is None:
            blocks = [(p.in_parts, p.out_parts, p.first, p.second) for p in self.slices]
            self._kernel_layout = compact_kernel.KernelLayout(
                blocks, self.in_features, self.out_features, self.weight.device, self.weight.dtype)
        return self._kernel_layout

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return self._layout().run(x2, self._parameters.get("bias"))

    def executions(self) -> tuple[str, ...]:
        """The executions calibration chooses from (``"kernel"`` needs Triton and a CUDA device, ``"grouped"``
        a CUDA device whose ``torch._grouped_mm`` takes this dtype)."""
        cuda = self.weight.device.type == "cuda"
        kernel = cuda and compact_kernel.available(self.weight.device)
        # On the CPU grouped matmuls are a loop over the groups plus a gather and a scatter: never faster
        # than "slices" here (3-4x slower measured), so not worth timing; run() still accepts it.
        grouped = cuda and _grouped_available(self.weight.device, self.weight.dtype)
        return tuple(e for e in EXECUTIONS if (e != "kernel" or kernel) and (e != "grouped" or grouped))

    def run(self, x: torch.Tensor, execution: str) -> torch.Tensor:
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        if execution == "kernel" and (reason := compact_kernel.unavailable_reason(self.weight.device)):
            raise ValueError(f"execution 'kernel' cannot run on {self.weight.device}: {reason}")
        if execution == "grouped" and not _grouped_available(self.weight.device, self.weight.dtype):
            raise ValueError(f"execution 'grouped' needs torch._grouped_mm for {self.weight.dtype} on {self.weight.device}")
        return self._execute(x, execution)

    def _execute(self, x: torch.Tensor, execution: str) -> torch.Tensor:
        """``execution`` (one this layer can run) on ``x``, after only the shape check."""
        self._check_input(x)
        y = getattr(self, "_" + execution)(x.reshape(-1, self.in_features))  # _dense, _factored, ..., _kernel
        return y.reshape(*x.shape[:-1], self.out_features)

    def choose(self, tokens: int) -> str:
        """The execution for ``tokens`` tokens: measured fastest at the nearest calibrated size (timed
        now if none is within a factor 2 and the layer calibrates on use), or by counted MACs when not
        calibrated."""
        choice = self._choices.get(tokens)
        if choice is not None:  # remembered: at one token the matmul itself takes only tens of microseconds
            return choice
        tokens = max(tokens, 1)
        if self.calibrate_on_use and compact_kernel.nearest_count(self.plan, tokens)[1] > math.log(2) and self._may_time():
            self.calibrate((tokens,))
        if not self.plan:
            return min((e for e in self.executions() if e not in self._hopeless), key=self.execution_macs)
        choice = self._choices[tokens] = self.plan[compact_kernel.nearest_count(self.plan, tokens)[0]]
        return choice

    @staticmethod
    def _may_time() -> bool:
        """Not while tracing or capturing a CUDA graph: timing runs real kernels and reads the clock."""
        if torch.compiler.is_compiling():
            return False
        return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())

    @torch.no_grad()
    def calibrate(self, token_counts=(1, 8, 64, 512, 4096), repeats: int = 5) -> dict[int, dict[str, float]]:
        """Time every execution at each token count (median of ``repeats``); returns the timings."""
        timings = {}
        device = self.weight.device
        # CUDA runs asynchronously: wait for the kernels before reading the clock.
        synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self._choices.clear()
        seconds = functools.partial(_median_seconds, count=repeats, synchronize=synchronize)
        for tokens in sorted(token_counts):
            x = torch.randn(tokens, self.in_features, dtype=self.weight.dtype, device=device)
            per_execution = {}
            for execution in self.executions():
                if execution in self._hopeless:
                    per_execution[execution] = math.inf
                    continue
                try:
                    if execution == "kernel":  # times each candidate tile set, after a warm-up that compiles it
                        per_execution[execution] = self._tune_kernel(x, seconds)
                        continue
                    self.run(x, execution)  # warm-up
                except Exception as error:  # any failure of an optional execution
                    if execution == "dense":
                        raise
                    # e.g. a Triton kernel this GPU cannot compile for this dtype: dense and the others remain
                    warnings.warn(f"compact layer: execution {execution!r} failed on {device} in {self.weight.dtype} "
                                  f"and is not used there ({type(error).__name__}: {str(error)[:200]})", stacklevel=2)
                    self._hopeless.add(execution)
                    per_execution[execution] = math.inf
                    continue
                per_execution[execution] = seconds(lambda: self._forward(x, execution))  # noqa: B023
            timings[tokens] = per_execution
            if tokens >= HOPELESS_FROM and per_execution["dense"] >= HOPELESS_DENSE_SECONDS:
                self._hopeless |= {e for e, t in per_execution.items() if t > 4 * per_execution["dense"]}
            fastest = min(per_execution, key=per_execution.get)
            # Leave dense only for a clear win: timings of tiny products are mostly noise.
            beats_dense = per_execution[fastest] < self.required_gain * per_execution["dense"]
            self.plan[tokens] = fastest if beats_dense else "dense"
        return timings

    def _tune_kernel(self, x: torch.Tensor, seconds) -> float:
        """Time the kernel with each of its candidate tiles on ``x`` and keep the fastest for this many
        tokens; returns its time. A candidate this GPU cannot build (too little shared memory) is skipped."""
        layout, tokens = self._layout(), x.numel() // self.in_features
        timings, failures = {}, []
        candidates = compact_kernel.tile_candidates(self.weight.dtype, tokens, layout.rank_tile)
        for tiles in candidates:
            layout.use_tiles(tokens, tiles)
            try:
                self.run(x, "kernel")  # the first call with new tiles compiles
            except Exception as error:  # noqa: BLE001 - whatever Triton raises for a kernel it cannot build
                failures.append(error)
                continue
            timings[tiles] = seconds(lambda: self._forward(x, "kernel"))
        if not timings:
            layout.use_tiles(tokens, candidates[0])
            raise failures[0]
        fastest = min(timings, key=timings.get)
        layout.use_tiles(tokens, fastest)
        return timings[fastest]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        return self._forward(x, self._choices.get(tokens) or self.choose(tokens))

    def _forward(self, x: torch.Tensor, execution: str) -> torch.Tensor:
        """``execution`` on ``x`` as the forward runs it (and calibration times it). Few Python operations
        on the way to the products: on a GPU a small product takes ~20 µs, and nn.Module's attribute
        lookup of a buffer costs about 0.5 µs where a dict lookup costs 0.05."""
        if execution == "dense" or execution == "factored":  # any leading shape, as F.linear takes it
            buffers = self._buffers
            try:
                if execution == "dense":
                    return F.linear(x, buffers["weight"], self._parameters.get("bias"))
                return F.linear(F.linear(x, buffers["in_factor"]), buffers["out_factor"], self._parameters.get("bias"))
            except RuntimeError:
                if x.dim() and x.shape[-1] == self.in_features:
                    raise  # not a shape problem: torch's own message
            # a wrong shape: _execute() says so in one line
        if execution == "kernel":
            if x.requires_grad and torch.is_grad_enabled():
                execution = "slices"  # the kernels have no backward
            elif x.dim() and x.shape[-1] == self.in_features:  # (the kernels take any leading shape)
                return self._layout().run(x, self._parameters.get("bias"))
        return self._execute(x, execution)  # chosen among executions(): nothing more to check

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_groups={len(self.groups)}, block_macs={self.macs_per_token()}, plan={self.plan}"
        )


def compact(model: nn.Module, inplace: bool = False, **options) -> nn.Module:
    """Replace every :class:`GBLRLinear` of ``model`` by its :class:`CompactGBLRLinear` (eval mode).

    Returns the model (a deep copy unless ``inplace``); ``options`` go to :class:`CompactGBLRLinear`.
    Example::

        fast = gblr.compact(trained_model)         # same predictions, block-sized work per layer
        fast.to("cuda")                            # timed again on first use on the new device
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if isinstance(model, GBLRLinear):
        return CompactGBLRLinear(model, **options)
    for name, module in list(model.named_modules()):
        if isinstance(module, GBLRLinear):
            model.set_submodule(name, CompactGBLRLinear(module, **options))
    return model
