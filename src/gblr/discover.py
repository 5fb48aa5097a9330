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

Greedy pieces stop short of a block's edges: a piece keeps only the rows and columns that raise its own
energy per MAC, so one hidden rank-k block ends up as many rank-1 pieces on slightly different, trimmed
windows. Consolidation merges pieces whose windows overlap into one block on their union, then moves
every edge while that removes more error than its MACs are worth and trades ranks between blocks
under the budget, then refits the blocks until the error stops falling; on blocks plus noise this
comes near the noise level where the pieces alone stay far above it.

Where the budget is just the blocks' cost, merged pieces rarely land on the true windows. So the
edges are also read from the data: a row whose part outside the span of the rows above it is far
larger than usual is where a block begins (and the same from below for where one ends, and on the
columns). Blocks placed greedily on windows between those edges are a second start for consolidation.

Even then, overlapping blocks end on windows a few rows or columns off, and with no MAC to spare no
single move fixes that: growing one window needs the MACs another holds. So the windows most pieces
of the best fit agree on are consolidated once more with a little budget to spare (``slack``), and
also kept as they are with only their ranks balanced (consolidation can carry a window out over a
neighbour it overlaps). Both are improved by moves each judged by the error after refitting every
block, trimmed back to the budget one verified step at a time, the step that costs the least error
per MAC first, and polished by passing a row or column from one block to another. Two nearly
coincident blocks leave pieces that agree on one window, their union; a trim step that splits a block
in two brings such a union down to the blocks' cost, and one that drops a block removes a spare block
holding ranks the others lack. Each step judges fits after a few hundred refit sweeps, which can stop
far from their error, so every result is refitted much longer and its ranks passed between blocks.
Last, a block one rank short whose MACs other blocks spent on a few rows too many gets that rank back
and the fit is trimmed to the budget again; the lowest of the results wins. None of this runs where
what the best fit leaves already looks like noise (its largest singular value at most a quarter above
what random noise of its energy would have), as it does on most fits where the budget leaves MACs
to spare.

This is a candidate of :func:`gblr.fit.fit_gblr` (``pursuit=True``); it costs minutes on a 200 x 320
matrix (9 to 45 at the blocks' cost in ``benchmarks/structure_discovery.py``, two jobs on two cores), far
more than the tilings, so it is not tried by default.
"""

from __future__ import annotations

import functools
import math
import statistics

import torch

from .block_fit import BlockFit, block_macs, cyclic_window, squared_norm
from .linalg import thin_svd
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


def _top_pair(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-1 approximation of ``block`` as ``(left * singular value, right)``."""
    u, s, vh = thin_svd(block)
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
        rows = cyclic_window(row_start, height, m)
        left = left[rows] / left[rows].norm().clamp_min(1e-300)
        right_full = residual[rows].T @ left
        col_start, width, ratio = _best_window(right_full.square(), height)
        cols = cyclic_window(col_start, width, n)
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


def _cyclic_union(a: tuple[int, int], b: tuple[int, int], length: int) -> tuple[int, int]:
    """The shortest cyclic window ``(start, size)`` holding windows ``a`` and ``b``: it starts where one
    of them starts and reaches to the farther of their ends."""
    def reach(start: int) -> int:
        return max((w[0] - start) % length + w[1] for w in (a, b))

    start = min((a[0], b[0]), key=reach)
    return start, min(reach(start), length)


def _overlap(a: tuple[int, int], b: tuple[int, int], length: int) -> float:
    """Intersection over union of two cyclic windows."""
    inside = torch.zeros(2, length, dtype=torch.bool)
    inside[0, cyclic_window(*a, length)] = inside[1, cyclic_window(*b, length)] = True
    return float(inside.all(0).sum()) / float(inside.any(0).sum())


def _groups(pieces: list, overlap: float, shape: tuple[int, int]) -> list[list]:
    """Pieces whose row and column windows both overlap by at least ``overlap`` (intersection over
    union, chained), grouped."""
    m, n = shape
    parent = list(range(len(pieces)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, a in enumerate(pieces):
        for j in range(i):
            b = pieces[j]
            if _overlap(a[:2], b[:2], m) >= overlap and _overlap(a[2:4], b[2:4], n) >= overlap:
                parent[root(i)] = root(j)
    grouped: dict[int, list] = {}
    for i, piece in enumerate(pieces):
        grouped.setdefault(root(i), []).append(piece)
    return list(grouped.values())


def _clusters(pieces: list, overlap: float, shape: tuple[int, int]) -> list[list[int]]:
    """Each group of overlapping pieces (:func:`_groups`) merged into one block on the union of their
    windows, of rank their number."""
    m, n = shape
    merged = []
    for group in _groups(pieces, overlap, shape):
        block = [*group[0][:4], len(group)]
        for piece in group[1:]:
            block[0:2] = _cyclic_union(tuple(block[0:2]), piece[:2], m)
            block[2:4] = _cyclic_union(tuple(block[2:4]), piece[2:4], n)
        merged.append(block)
    return merged


def _agreed_blocks(pieces: list, overlap: float, shape: tuple[int, int], least: int = 3) -> list[list[int]]:
    """Each group of at least ``least`` overlapping pieces (:func:`_groups`) as one block on the median
    of their windows' edges, of rank their number. The pieces of one hidden block sit on its window or
    trimmed ones, so their median edges are mostly its edges, where a union reaches as far as the
    widest stray piece; a window fewer pieces agree on is more often a stray than a block."""
    m, n = shape
    agreed = []
    for group in _groups(pieces, overlap, shape):
        if len(group) < least:
            continue
        edges = [statistics.median_high(edge) for edge in zip(*[(p[0], p[0] + p[1], p[2], p[2] + p[3]) for p in group])]
        height, width = min(m, edges[1] - edges[0]), min(n, edges[3] - edges[2])
        if min(height, width) >= len(group):
            agreed.append([edges[0] % m, height, edges[2] % n, width, len(group)])
    return agreed


def _balance_ranks(blocks: BlockFit, spectra: list[torch.Tensor], allowed: float) -> None:
    """Ranks moved to where a MAC removes the most error: drop the cheapest while over ``allowed``,
    spend what is left on the best, then trade a rank from the block that loses least per MAC to
    the one that gains most while that pays."""
    windows = blocks.windows
    size = [w[1] + w[3] for w in windows]

    def gain(i: int) -> float:  # error removed per MAC by one more rank
        return float(spectra[i][windows[i][4]].square()) / size[i] if windows[i][4] < len(spectra[i]) else 0.0

    def loss(i: int) -> float:  # error added per MAC by one rank less
        return float(spectra[i][windows[i][4] - 1].square()) / size[i] if windows[i][4] else math.inf

    everyone = range(len(windows))
    while blocks.cost() > allowed:
        windows[min(everyone, key=loss)][4] -= 1
    for _ in range(4 * len(windows)):
        best, cheapest = max(everyone, key=gain), min(everyone, key=loss)
        if gain(best) > 0 and blocks.cost() + size[best] <= allowed:
            windows[best][4] += 1
        elif best != cheapest and gain(best) > loss(cheapest):
            windows[cheapest][4] -= 1
            if blocks.cost() + size[best] <= allowed:
                windows[best][4] += 1
        else:
            break


_EDGE_STEPS = (-16, -8, -4, -2, -1, 1, 2, 4, 8, 16)


def _move_edges(blocks: BlockFit, i: int, price: float) -> None:
    """Move each edge of block ``i``'s windows to where it removes the most error net of its MACs
    at ``price`` (error per MAC): the pieces found its windows trimmed to their own best ratio."""
    m, n = blocks.target.shape
    blocks.lift(i)
    window = blocks.windows[i]
    rank = window[4]

    def net(w) -> float:
        return blocks.captured(w, rank) - price * rank * (w[1] + w[3])

    best = net(window)
    for edge in range(4):
        for step in _EDGE_STEPS:  # shifts down or right; :func:`_moved_edge` counts outwards
            moved = _moved_edge(window, edge, -step if edge in (0, 2) else step, (m, n))
            if moved is not None:
                value = net(moved)
                if value > best:
                    best, window[:4] = value, moved[:4]
    blocks.refit(i)


def _stays_inside(moved, window, shape: tuple[int, int]) -> bool:
    """Whether ``moved`` is a window of the matrix whose edges did not cross its border: letting a
    block wrap around to the far rows or columns made the fits worse."""
    (m, n), (r0, h, c0, w) = shape, window[:4]
    return (0 <= moved[0] < m and 0 < moved[1] <= m and 0 <= moved[2] < n and 0 < moved[3] <= n
            and (moved[0] + moved[1] > m) == (r0 + h > m) and (moved[2] + moved[3] > n) == (c0 + w > n))


def _consolidated(target: torch.Tensor, merged: list[list[int]], budget: float, rounds: int = 30) -> BlockFit:
    """Block pursuit's pieces turned into blocks: pieces of one hidden block found it on slightly
    different, trimmed windows; merged (:func:`_clusters`), given one window and a rank, their edges moved
    and their ranks rebalanced under the budget, they can fit the block exactly. Rounds of edge moves and
    rank trades run until neither changes anything, at most ``rounds`` (on the hidden-block matrices of
    ``benchmarks/structure_discovery.py`` they settle within 30; stopping at 8 left block pursuit's mean
    error at exactly the blocks' cost at 0.052, where 30 brought it to 0.041)."""
    m, n = target.shape
    allowed = budget * m * n
    blocks = BlockFit(target, [list(window) for window in merged])
    size = [w[1] + w[3] for w in blocks.windows]
    while blocks.cost() > allowed:  # the unions are larger than the pieces: drop ranks of the largest first
        blocks.windows[max((i for i, w in enumerate(blocks.windows) if w[4]), key=size.__getitem__)][4] -= 1
    for _ in range(rounds):
        before = [list(w) for w in blocks.windows]
        spectra = blocks.sweep()
        kept = [float(s[w[4] - 1].square()) / (w[1] + w[3]) for s, w in zip(spectra, blocks.windows) if w[4]]
        price = min(kept, default=0.0)  # the error per MAC of the cheapest rank in use
        for i, window in enumerate(blocks.windows):
            if window[4]:
                _move_edges(blocks, i, price)
        _balance_ranks(blocks, blocks.sweep(), allowed)
        if blocks.windows == before:  # no edge moved, no rank traded
            break
    blocks.converge()
    return blocks


def _ranked(target: torch.Tensor, windows: list[list[int]], allowed: float) -> BlockFit:
    """Blocks on ``windows`` as they are, refitted to convergence, their ranks balanced within ``allowed``
    MACs and refitted again. Consolidation moves edges to capture more energy, which can carry a block's
    window out over a neighbour it overlaps; these start the verified moves from the windows as read.
    (Balancing on the spectra of a single sweep, before the overlapping blocks have passed error to
    each other, moved ranks from where they belong.)"""
    blocks = BlockFit(target, [list(window) for window in windows])
    blocks.converge()
    _balance_ranks(blocks, blocks.sweep(), allowed)
    blocks.converge()
    return blocks


def _moved_edge(window, edge: int, step: int, shape: tuple[int, int]) -> list[int] | None:
    """``window`` with its top, bottom, left or right edge (``edge`` 0-3) moved out by ``step`` (in when
    negative); None where that crosses the border or leaves less room than the rank."""
    r0, h, c0, w = window[:4]
    moved = ((r0 - step, h + step, c0, w), (r0, h + step, c0, w), (r0, h, c0 - step, w + step), (r0, h, c0, w + step))[edge]
    if _stays_inside(moved, window, shape) and min(moved[1], moved[3]) >= window[4]:
        return [*moved, window[4]]
    return None


def _improved(blocks: BlockFit, allowed: float, rounds: int = 5) -> BlockFit:
    """Local search in which every move is judged by the error after refitting all blocks to convergence
    (not by the moved block's own gain, which misjudges moves where blocks overlap): one edge of a block
    moved (ranks then rebalanced, :func:`_balance_ranks`), or one rank passed from a block to another,
    kept when it lowers the error within ``allowed`` MACs; up to ``rounds`` passes."""
    shape = blocks.target.shape
    for _ in range(rounds):
        start = squared_norm(blocks.residual)
        for i in range(len(blocks.windows)):
            for edge in range(4) if blocks.windows[i][4] else ():
                for step in (1, -1, 2, -2, 4, -4, 8, -8):
                    moved = _moved_edge(blocks.windows[i], edge, step, shape)
                    if moved is not None:
                        trial = blocks.copy()
                        trial.reshape(i, moved)
                        _balance_ranks(trial, trial.sweep(), allowed)
                        blocks = _better(trial, blocks, allowed)
        for i in range(len(blocks.windows)):
            for j in range(len(blocks.windows)):
                giver, taker = blocks.windows[i], blocks.windows[j]
                if i == j or not giver[4] or taker[4] >= min(taker[1], taker[3]):
                    continue
                trial = blocks.copy()
                trial.reshape(i, [*giver[:4], giver[4] - 1])
                trial.reshape(j, [*taker[:4], taker[4] + 1])
                blocks = _better(trial, blocks, allowed)
        if squared_norm(blocks.residual) == start:
            break
    return blocks


def _better(trial: BlockFit, blocks: BlockFit, allowed: float) -> BlockFit:
    """``trial`` refitted to convergence if that leaves less error than ``blocks`` within ``allowed`` MACs,
    else ``blocks``."""
    if trial.cost() > allowed:
        return blocks
    trial.converge()
    return trial if _lower(trial, blocks) else blocks


def _error(blocks: BlockFit) -> float:
    """The squared error ``blocks`` leave."""
    return squared_norm(blocks.residual)


def _lower(trial: BlockFit, blocks: BlockFit) -> bool:
    """Whether ``trial`` leaves less error than ``blocks`` by more than rounding (a millionth of it)."""
    return _error(trial) < (1 - 1e-6) * _error(blocks)


def _screened(trials: list[BlockFit], key, screen: int, finalists: int, most: int = 300,
              refit=BlockFit.converge) -> BlockFit | None:
    """The trial ``key`` ranks first: all refitted by ``screen`` steps of ``refit`` (sweeps of
    :meth:`BlockFit.converge` or steps of :meth:`BlockFit.converge_jointly`), the ``finalists`` ranked
    first then by up to ``most`` in all and ranked again (refitting every trial in full cost most of the
    time)."""
    for trial in trials:
        refit(trial, most=screen)
    kept = sorted(trials, key=key)[:finalists]
    for trial in kept:
        refit(trial, most=most - screen)
    return min(kept, key=key, default=None)


def _trimmed(blocks: BlockFit, allowed: float, screen: int = 30, finalists: int = 4,
             split: tuple[int, ...] = (8, 16), most: int = 300, refit=BlockFit.converge) -> BlockFit:
    """``blocks`` brought down to ``allowed`` MACs one verified step at a time: of dropping one rank of a
    block, moving one of its edges in by 1, 2, 4 or 8, or splitting it (half its ranks moved to a block
    on its window with one edge moved in by a step in ``split``), the step that adds the least error per
    MAC it saves once all blocks are refitted (:func:`_screened`: ``screen`` steps of ``refit``, up to
    ``most`` for the ``finalists``). Two nearly coincident blocks end as one block of twice the rank on their union,
    which only a split brings down to their cost: half the union's ranks can give up as many rows or
    columns as they number at no error, and the edge moves that follow take each half to one block. A
    split is tried only where the half keeps at least as many ranks as the rows or columns it loses
    (with steps of 8 and 16, blocks of rank 16 or more): letting smaller blocks split broke them into
    slivers of one or two ranks at about the same error, trimming about five times slower. The step may
    also drop a whole block, its MACs given to the others' ranks (:func:`_balance_ranks`) up to
    ``allowed``: a spare block holding ranks two others lack survives every one-rank or one-edge step
    (balanced only to the MACs the step must save, such a drop was never chosen)."""
    shape = blocks.target.shape
    while blocks.cost() > allowed:
        error, cost, trials = squared_norm(blocks.residual), blocks.cost(), []
        for i, window in enumerate(blocks.windows):
            if not window[4]:
                continue
            shrunk = [_moved_edge(window, edge, -step, shape) for edge in range(4) for step in (1, 2, 4, 8)]
            for smaller in [[*window[:4], window[4] - 1]] + [moved for moved in shrunk if moved is not None]:
                trial = blocks.copy()
                trial.reshape(i, smaller)
                trials.append(trial)
            if len(blocks.windows) > 1:  # a spare block holding ranks the others lack gives them its MACs
                trial = blocks.without(i)
                trial.converge()
                _balance_ranks(trial, trial.sweep(), allowed)
                trials.append(trial)
            half = window[4] // 2
            for step in (step for step in split if step <= half):
                for part in [_moved_edge([*window[:4], half], edge, -step, shape) for edge in range(4)]:
                    if part is not None:
                        trial = blocks.copy()
                        trial.split_off(i, part)
                        trials.append(trial)

        def price(trial: BlockFit) -> float:
            return (squared_norm(trial.residual) - error) / (cost - trial.cost())

        blocks = _screened(trials, price, screen, finalists, most, refit)
        refit(blocks)
    return blocks


def _swapped(blocks: BlockFit, allowed: float, screen: int = 10, finalists: int = 4, rounds: int = 20,
             steps: tuple[int, ...] = (1, 2, 4, 8), most: int = 200) -> BlockFit:
    """Edges passed between blocks within ``allowed`` MACs: one edge of a block moved out by a step in
    ``steps`` rows or columns, alone where the MACs trimming left spare allow it, or with one edge of
    another block moved in by as many; the move that lowers the error most once all blocks are refitted
    together (:meth:`BlockFit.converge_jointly`, ``screen`` steps for every move, up to ``most`` for the
    ``finalists`` of each step size), until none does (at most ``rounds`` times). Trimming one step at a time can end a row
    off on two blocks at once, where neither move alone lowers the error, or rows short of a block's
    window with the MACs for them unspent. Where one block took four columns that another block's four
    missing rows needed, moving one, two or three of them raised the error and moving all four brought
    it to the noise, but only the joint refit ranked that move above the others: after 30 sweeps of
    one-block-at-a-time refits it ranked below the moves by one. Trimming moves edges by up to 8, so a
    block can end 8 columns wide where another lacks 8 rows; with steps of at most 4 that fit stayed at
    0.014 relative error, passing all 8 at once took it to the exact windows. A larger move starts
    further from its refitted error, so after the same few steps moves by one ranked above it (it was not
    among the first 12): each step size has its own finalists."""
    shape = blocks.target.shape
    for _ in range(rounds):
        trials, cost = {step: [] for step in steps}, blocks.cost()
        shrunk = [(i, step, smaller) for i, giver in enumerate(blocks.windows) if giver[4] for step in steps
                  for smaller in (_moved_edge(giver, inner, -step, shape) for inner in range(4)) if smaller is not None]
        for j, taker in enumerate(blocks.windows):
            for step, larger in ((step, _moved_edge(taker, outer, step, shape)) for outer in range(4) for step in steps) if taker[4] else ():
                if larger is None:
                    continue
                for i, smaller in [(None, None)] + [(i, smaller) for i, by, smaller in shrunk if i != j and by == step]:
                    saved = 0 if i is None else block_macs(blocks.windows[i]) - block_macs(smaller)
                    if cost + block_macs(larger) - block_macs(taker) - saved > allowed:
                        continue
                    trial = blocks.copy()
                    if i is not None:
                        trial.reshape(i, smaller)
                    trial.reshape(j, larger)
                    trials[step].append(trial)
        bests = [_screened(group, _error, screen, finalists, most, BlockFit.converge_jointly) for group in trials.values()]
        best = min((best for best in bests if best is not None), key=_error, default=None)
        if best is None or not _lower(best, blocks):
            break
        blocks = best
    return blocks


def _polished(blocks: BlockFit, allowed: float, most: int = 2000, tolerance: float = 1e-6,
              starts: tuple[int, ...] = (1, 10)) -> BlockFit:
    """``blocks`` refitted together (:meth:`BlockFit.converge_jointly`) until a step lowers the error by
    less than ``tolerance`` of it, or a fresh fit on its windows refitted so (:meth:`BlockFit.fitted` from
    ``starts``: the joint refit is local) if that leaves less error; then, while that lowers the error, one
    more rank for a block, taken from another block or from MACs left spare within ``allowed``, each
    judged by a fresh fit refitted as long. The stage's other steps judge fits after a few hundred steps,
    which can stop far from the fit's error: on a hidden-block matrix, blocks on the exact windows stood at
    0.0094 relative error after 2000 sweeps of one-block-at-a-time refits and reached the noise (0.0027)
    after 1000 joint steps; a rank passed to the block that lacked it raised the error after 30 sweeps
    (0.040 to 0.055) and brought it to the noise after 1000. Fits continued from another can stall where a
    fresh one does not (0.044 against 0.0027 on the same windows; 0.0097 on a third matrix's exact windows
    in the order block pursuit left them)."""
    def fresh(windows: list[list[int]]) -> BlockFit:
        return BlockFit.fitted(blocks.target, windows, starts, most, tolerance)

    blocks.converge_jointly(most=most, tolerance=tolerance)
    refitted = fresh(blocks.windows)
    return _ranks_passed(refitted if _lower(refitted, blocks) else blocks, allowed, fresh)


def _ranks_passed(blocks: BlockFit, allowed: float, fresh) -> BlockFit:
    """While that lowers the error, one more rank for a block of ``blocks``, taken from another block or
    from MACs left spare within ``allowed``, each judged by ``fresh`` (a fresh fit on the new windows)."""
    while True:
        trials, cost = [], blocks.cost()
        for j, taker in enumerate(blocks.windows):
            if not 0 < taker[4] < min(taker[1], taker[3]):
                continue
            for i, giver in [(None, None)] + [(i, giver) for i, giver in enumerate(blocks.windows) if i != j and giver[4]]:
                if cost + taker[1] + taker[3] - (0 if i is None else giver[1] + giver[3]) <= allowed:
                    windows = [list(window) for window in blocks.windows]
                    windows[j][4] += 1
                    if i is not None:
                        windows[i][4] -= 1
                    trials.append(windows)
        best = min(map(fresh, trials), key=_error, default=None)
        if best is None or not _lower(best, blocks):
            return blocks
        blocks = best


def _regrown(blocks: BlockFit, allowed: float, tries: int = 2) -> BlockFit:
    """``blocks`` given one more rank on one block, then trimmed back to ``allowed`` MACs with every step
    judged by joint refits (:func:`_trimmed` with :meth:`BlockFit.converge_jointly`), kept where a fresh
    fit on the trimmed windows leaves less error; repeated until no block's rank does, each round trying
    the ``tries`` blocks whose extra rank lowers the error most after 10 joint steps; its ranks passed
    between blocks again (:func:`_ranks_passed`) if anything was kept (it is a fresh fit already). A fit
    at the budget can hold a block one rank short with the MACs for that rank spread as a few spare rows
    and columns over other blocks, which then carry part of the missing rank: no single edge or rank
    move lowers the error, since each removes a part of that rank or needs MACs no block has spare. With
    the rank back on its block, those rows and columns hold nothing and trimming takes them first, but
    only joint refits move the rank's content back fast enough for trimming to see it: judged by
    one-block sweeps, trimming took the grown rank off again (0.065 to 0.069 relative error), judged by
    joint steps it reached the exact windows (0.0027)."""
    fresh, grown = functools.partial(BlockFit.fitted, blocks.target), False

    while True:
        trials = []
        for j, window in enumerate(blocks.windows):
            if 0 < window[4] < min(window[1], window[3]):
                trial = blocks.copy()
                trial.reshape(j, [*window[:4], window[4] + 1])
                trial.converge_jointly(most=10)
                trials.append(trial)
        for trial in sorted(trials, key=_error)[:tries]:
            trimmed = _trimmed(trial, allowed, screen=10, most=200, refit=BlockFit.converge_jointly)
            refitted = fresh(trimmed.windows)
            if _lower(refitted, blocks):
                blocks, grown = refitted, True
                break
        else:
            return _ranks_passed(blocks, allowed, fresh) if grown else blocks


def _novelty(target: torch.Tensor, lookback: int) -> torch.Tensor:
    """Each row's norm outside the span of the ``lookback`` rows above it (directions under 1 % of their
    largest singular value left out). A block's first rows bring directions the rows above lack, so
    the score jumps where a block begins and stays high for about its rank in rows."""
    m = target.shape[0]
    score = torch.full((m,), math.inf, dtype=target.dtype)  # row 0 begins whatever is there
    for r in range(1, m):
        _, s, vh = thin_svd(target[max(0, r - lookback):r])
        basis = vh[s > 0.01 * s[0]]
        score[r] = (target[r] - (target[r] @ basis.mT) @ basis).norm()
    return score


def _onsets(score: torch.Tensor, factor: float, most: int) -> list[int]:
    """First rows of the runs where ``score`` exceeds ``factor`` times its median (row 0 always), the
    ``most`` highest-scoring of them if there are more."""
    finite = score[score.isfinite()]
    if not finite.numel():
        return [0]
    high = score > factor * max(float(finite.median()), 1e-12 * float(finite.max()))  # not 0 on exact ranks
    found = [r for r in range(len(score)) if high[r] and (r == 0 or not high[r - 1])]
    return sorted(sorted(found, key=lambda r: -float(score[r]))[:most])


def _edge_windows(target: torch.Tensor, factor: float, lookback: int, shortest: int, most: int):
    """Row windows ``(start, size)`` from every start to every end (exclusive) at least ``shortest`` rows
    further: starts are the onsets of high novelty read from the top, ends the same read from the
    bottom."""
    m = target.shape[0]
    starts = _onsets(_novelty(target, lookback), factor, most)
    ends = [m - r for r in _onsets(_novelty(target.flip(0), lookback), factor, most)]
    return [(start, end - start) for start in starts for end in ends if end - start >= shortest]


def _window_energies(residual: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Squared norm of ``residual`` on each non-wrapping window (rows of ``windows``: r0, h, c0, w), from
    2-D prefix sums."""
    prefix = torch.nn.functional.pad(residual.square().cumsum(0).cumsum(1), (1, 0, 1, 0))
    r0, h, c0, w = windows.unbind(1)
    return prefix[r0 + h, c0 + w] - prefix[r0, c0 + w] - prefix[r0 + h, c0] + prefix[r0, c0]


def _read_edges(target: torch.Tensor, factor: float = 20.0, lookback: int = 80, shortest: int = 10,
                most: int = 12) -> tuple[list, list]:
    """Row windows and column windows between edges read from the data (:func:`_edge_windows`)."""
    return (_edge_windows(target, factor, lookback, shortest, most),
            _edge_windows(target.mT, factor, lookback, shortest, most))


def _edge_seeds(target: torch.Tensor, budget: float, edges: tuple[list, list], settle: int = 0) -> list[list[int]]:
    """Blocks to start consolidation from, on windows between edges (``edges``: row windows and column
    windows, :func:`_read_edges`): greedily, by squared error removed per MAC,
    a rank-1 block on one of those windows or one more rank on a block already placed, then a refit of
    that block, until the budget is spent; none where no edges stand out. Pursuit's pieces trim a large
    block's edges and split overlapping blocks between them; these windows start at the blocks' edges.
    ``settle`` sweeps of :meth:`BlockFit.refine` after each placement let the blocks already placed give
    up what the new one fits better, so later choices see a residual closer to what the blocks will leave."""
    m, n = target.shape
    allowed = budget * m * n
    rows, cols = edges
    if len(rows) * len(cols) <= 1:  # no edges found: blocks on the whole matrix are a low-rank fit
        return []
    windows = torch.tensor([[r0, h, c0, w] for r0, h in rows for c0, w in cols], dtype=torch.long)
    size = (windows[:, 1] + windows[:, 3]).to(target.dtype)
    room = torch.minimum(windows[:, 1], windows[:, 3])  # the most rank a block on each window can have
    blocks, placed = BlockFit(target, []), {}
    while True:
        ranks = torch.tensor([blocks.windows[placed[j]][4] if j in placed else 0 for j in range(len(windows))])
        usable = (blocks.cost() + size <= allowed) & (ranks < room)
        bound = torch.where(usable, _window_energies(blocks.residual, windows) / size, 0.0)
        best, gain = None, 0.0
        for j in bound.argsort(descending=True).tolist():
            if float(bound[j]) <= gain:  # a window's energy bounds what one rank captures there
                break
            value = blocks.captured(windows[j].tolist(), 1) / float(size[j])
            if value > gain:
                best, gain = j, value
        if best is None:
            return blocks.windows
        if best in placed:
            blocks.windows[placed[best]][4] += 1
        else:
            placed[best] = len(blocks.windows)
            blocks.windows.append([*windows[best].tolist(), 1])
            blocks.fits.append(None)
        blocks.refit(placed[best])
        for _ in range(settle):
            blocks.refine_all()


def _only_noise_left(residual: torch.Tensor, margin: float = 1.25) -> bool:
    """Whether ``residual`` looks like noise alone: its largest singular value is at most ``margin`` times
    that of an i.i.d. matrix of its shape and energy, ``sigma * (sqrt(m) + sqrt(n))``. A block missed by a
    few rows leaves one direction far above that (3.1 to 6.8 times before the last stage on all 17
    hidden-block matrices measured at their cost, at errors of 0.008 to 0.059), a fit at the noise 1.03
    to 1.06. A rank-1 part left under the margin holds at most 2.5 % of the noise's energy on a 200 x 320
    matrix."""
    m, n = residual.shape
    sigma = float(residual.norm()) / math.sqrt(m * n)
    return float(thin_svd(residual)[1][0]) <= margin * sigma * (math.sqrt(m) + math.sqrt(n))


def _agreed_windows_refitted(target: torch.Tensor, best: list, error: float, budget: float, slack: float,
                             agreement: tuple[float, ...]) -> list:
    """Block pursuit's last stage: for each threshold in ``agreement``, blocks on the windows at least three
    of ``best``'s pieces agree on (:func:`_agreed_blocks`), where they hold at least three quarters of its
    pieces, consolidated with ``slack`` more of the budget and separately only given ranks on those
    windows (:func:`_ranked`); each improved by verified moves (:func:`_improved`), trimmed back to the
    budget (:func:`_trimmed`) and polished by passing edges between blocks (:func:`_swapped`). Each of
    these is refitted further and its ranks passed between blocks (:func:`_polished`; 18-61 s a fit on
    the hidden-block matrices at their cost), then given a rank and trimmed back while that lowers the
    error (:func:`_regrown`): the fit that regrowing repairs need not be the one with the least error
    before it (on one matrix, a seven-block fit at 0.063 relative error that regrowing left as it was,
    and a five-block fit one rank short at 0.065 that it took to the noise, 0.0027, in 62 s). Edges are
    passed between the chosen fit's blocks once more, by up to 12 rows or columns (:func:`_swapped`), and
    the result polished if that moved any: regrowing can leave a block too wide where another lacks as
    many rows, and on one matrix a fit left so at 0.028 reached its exact windows (0.0028) only when all
    12 could move at once (moves of at most 8 stopped at 0.0165). Returns the pieces of the fit that
    leaves the least error if they leave less squared error than ``best`` (which leaves ``error``), else
    ``best``."""
    m, n = target.shape
    allowed = budget * m * n
    fits, agreements = [], []
    for overlap in agreement:
        agreed = _agreed_blocks(best, overlap, (m, n))
        if sum(block[4] for block in agreed) < 0.75 * len(best) or agreed in agreements:
            continue  # pieces agree too little for block structure (81-96 % on hidden blocks, 39-74 % on MiniLM), or tried
        agreements.append(agreed)
        for roomy in _consolidated(target, agreed, budget * (1 + slack)), _ranked(target, agreed, allowed * (1 + slack)):
            fits.append(_swapped(_trimmed(_improved(roomy, allowed * (1 + slack)), allowed), allowed))
    if not fits:
        return best
    found = min((_regrown(_polished(fit, allowed), allowed) for fit in fits), key=_error)
    swapped = _swapped(found, allowed, steps=(1, 2, 4, 8, 12))
    if swapped is not found:
        found = _polished(swapped, allowed)
    return found.pieces() if _error(found) < error else best


@torch.no_grad()
def block_pursuit(weight: torch.Tensor, budget: float, bias: torch.Tensor | None = None, grid: int = 3,
                  sweeps: int = 10, overlaps: tuple[float, ...] = (0.5, 0.7, 0.85),
                  edges: bool | tuple[list, list] = True, slack: float | None = 0.06,
                  agreement: tuple[float, ...] = (0.85, 0.9)) -> GBLRLinear:
    """A GBLR layer of pieces on discovered windows, costing at most ``budget`` of ``weight``'s dense
    MACs.

    Greedy rank-1 pieces by squared error removed per MAC (windows searched from the whole matrix and
    from every tile of a ``grid x grid`` tiling), then ``sweeps`` rounds of refitting every piece to
    what the others leave on its windows (each round lowers the error). Then, for each threshold in
    ``overlaps``, the pieces are consolidated into rank-k blocks (:func:`_consolidated`). With ``edges``,
    consolidation also starts from blocks on windows whose edges are read from the data
    (:func:`_edge_seeds`, placed three times, the blocks settled by 0, 5 and 30 refit sweeps after each
    placement), once as they were placed and once split into rank-1 blocks that move their edges one by
    one. Last, the windows the best candidate's pieces agree on are refitted with ``slack`` more of the
    budget and trimmed back to it (:func:`_agreed_windows_refitted`, once for each threshold in
    ``agreement``) unless what the best candidate leaves looks like noise alone (:func:`_only_noise_left`:
    on a 200 x 320 hidden-block matrix already at the noise without it, the stage took the fit from 147 s
    to 626 s at budget 0.25, and from 218 s to over 34 min at 0.35); ``slack=None`` skips this. A looser
    threshold chains the pieces of two overlapping blocks into one group, a stricter one splits a block's
    pieces, so two are tried. The candidate with the smallest error wins, so ``edges`` and ``slack`` can
    only lower it. A pair ``(row windows, column windows)`` of ``(start, size)`` tuples in place of
    ``True`` starts from those windows instead of the ones read from the data (to measure what reading
    them loses)."""
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
    greedy = [(int(rows[0]), len(rows), int(cols[0]), len(cols), left, right) for rows, cols, left, right in pieces]
    starts = [_clusters(greedy, overlap, (m, n)) for overlap in overlaps]
    edge_windows = _read_edges(target) if edges is True else edges
    for settle in (0, 5, 30) if edge_windows else ():  # the greedy placement is fragile: three differently settled runs
        placed = _edge_seeds(target, budget, edge_windows, settle)
        starts += [placed, [[*window[:4], 1] for window in placed for _ in range(window[4])]]
    found, left, tried = greedy, residual, []
    for merged in starts:
        if not merged or merged in tried:  # nothing to start from, or another threshold merged the same pieces
            continue
        tried.append(merged)
        blocks = _consolidated(target, merged, budget)
        if squared_norm(blocks.residual) < squared_norm(left):
            found, left = blocks.pieces(), blocks.residual
    error = squared_norm(left)
    if slack is not None and not _only_noise_left(left):
        found = _agreed_windows_refitted(target, found, error, budget, slack, agreement)
    out_factors = torch.zeros(len(found), 1, m, dtype=torch.float64)
    in_factors = torch.zeros(len(found), 1, n, dtype=torch.float64)
    for k, (r0, h, c0, w, left, right) in enumerate(found):
        out_factors[k, 0, cyclic_window(r0, h, m)], in_factors[k, 0, cyclic_window(c0, w, n)] = left, right
    layer = GBLRLinear.from_intervals([(p[0], p[1]) for p in found], [(p[2], p[3]) for p in found],
                                      out_factors.to(weight.dtype), in_factors.to(weight.dtype),
                                      None if bias is None else bias.detach().cpu())
    layer.eval()
    return layer
