"""Rank-k blocks on windows of a matrix, fitted together to it: the model block pursuit searches over
(:mod:`gblr.discover`).

A block is a rank-k matrix living on one cyclic window of rows and one of columns; a fit is a set of
them whose sum approximates a target. Fitting one block to what the others leave on its windows is a
truncated SVD; fitting all of them together is a least-squares problem in their factors, solved here by
alternating least squares: all blocks' left factors at once given the right ones (each row is a small
least-squares problem over the blocks that cover it), then all right factors, with an extrapolation
step that keeps going in the direction the last step moved while that lowers the error. Refitting one
block at a time (block coordinate descent) passes error back and forth between overlapping blocks: on
five overlapping blocks 100 joint steps did what 300 to 1000 sweeps did, and where sweeps slowed to a
crawl far from the noise, joint steps kept gaining (``benchmarks/structure_discovery.py --sweeps``).
"""

from __future__ import annotations

import torch

from .linalg import thin_svd

__all__ = ["BlockFit", "JointSolve", "block_macs", "cyclic_window", "squared_norm"]


def cyclic_window(start: int, size: int, length: int) -> torch.Tensor:
    """Indices of the ``size`` positions from ``start`` on, wrapping around ``length``."""
    return (start + torch.arange(size)) % length


class BlockFit:
    """Rank-k blocks on cyclic windows and what they leave of ``target`` (``residual``). ``windows`` are
    ``[row start, height, col start, width, rank]`` lists. :meth:`refit` and :meth:`refine` fit one block
    to what the others leave on its windows (``sweep()`` and ``refine_all()`` do every block once: block
    coordinate descent); :meth:`converge` repeats ``refine_all()`` until the error stops falling and
    :meth:`converge_jointly` fits all blocks together."""

    def __init__(self, target: torch.Tensor, windows: list[list[int]]) -> None:
        self.target, self.residual = target, target.clone()
        self.windows = windows  # [row start, height, col start, width, rank] each
        self.fits: list[torch.Tensor | None] = [None] * len(windows)
        self._bases: dict[int, torch.Tensor] = {}  # each refitted block's right singular vectors, for refine()

    def _where(self, window) -> tuple:
        """Index of ``window`` in the matrix: slices (a view) unless it wraps around an edge."""
        m, n = self.target.shape
        r0, h, c0, w = window[:4]
        if r0 + h <= m and c0 + w <= n:
            return slice(r0, r0 + h), slice(c0, c0 + w)
        return cyclic_window(r0, h, m).unsqueeze(1), cyclic_window(c0, w, n)

    def _add(self, window, values: torch.Tensor) -> None:
        where = self._where(window)
        if isinstance(where[0], slice):
            self.residual[where] += values
        else:
            self.residual.index_put_(where, values, accumulate=True)

    def lift(self, i: int) -> None:
        """Give block ``i``'s fit back to the residual."""
        if self.fits[i] is not None:
            self._add(self.windows[i], self.fits[i])
            self.fits[i] = None

    def split_off(self, i: int, window: list[int]) -> None:
        """Move ``window[4]`` of block ``i``'s ranks to a new block on ``window`` and refit both."""
        self.reshape(i, [*self.windows[i][:4], self.windows[i][4] - window[4]])
        self.windows.append(list(window))
        self.fits.append(None)
        self.refit(len(self.windows) - 1)

    def without(self, i: int) -> BlockFit:
        """A copy with block ``i`` removed (its fit given back to the residual)."""
        twin = self.copy()
        twin.lift(i)
        del twin.windows[i], twin.fits[i]
        twin._bases = {j - (j > i): basis for j, basis in twin._bases.items() if j != i}
        return twin

    def copy(self) -> BlockFit:
        """An independent copy (its own residual, windows and fits), to try a change on."""
        twin = BlockFit(self.target, [list(window) for window in self.windows])
        twin.residual, twin.fits, twin._bases = self.residual.clone(), list(self.fits), dict(self._bases)
        return twin

    def reshape(self, i: int, window: list[int]) -> None:
        """Put block ``i`` on ``window`` (``[row start, height, col start, width, rank]``) and refit it."""
        self.lift(i)
        self.windows[i] = list(window)
        self.refit(i)

    def refit(self, i: int) -> torch.Tensor:
        """Refit block ``i`` (its rank, its windows) to the residual; returns the windows' singular values."""
        self.lift(i)
        rank = self.windows[i][4]
        u, s, vh = thin_svd(self.residual[self._where(self.windows[i])])
        self.fits[i] = (u[:, :rank] * s[:rank]) @ vh[:rank]
        self._bases[i] = vh[:rank].mT
        self._add(self.windows[i], -self.fits[i])
        return s

    def _stale(self, i: int) -> bool:
        """Whether block ``i`` has no fit, or its rank or window changed since its last fit."""
        window, basis = self.windows[i], self._bases.get(i)
        return self.fits[i] is None or basis is None or basis.shape != (window[3], window[4])

    def refine(self, i: int) -> None:
        """Refit block ``i`` by one step of subspace iteration from its last fit's right singular vectors
        instead of a full SVD (a full refit where there is none of the block's shape). A sweep of these
        lowers the error a little less than a sweep of full refits but costs about a fifteenth as much,
        and both reach the same fits (``benchmarks/structure_discovery.py --sweeps``)."""
        if self._stale(i):
            self.refit(i)
            return
        window, basis = self.windows[i], self._bases[i]
        self.lift(i)
        region = self.residual[self._where(window)]
        left = torch.linalg.qr(region @ basis).Q
        right = left.mT @ region  # the best fit whose columns lie in left's span
        self.fits[i] = left @ right
        self._bases[i] = torch.linalg.qr(right.mT).Q
        self._add(window, -self.fits[i])

    def sweep(self) -> list[torch.Tensor]:
        """Refit every block once, in order; returns each block's window singular values."""
        return [self.refit(i) for i in range(len(self.windows))]

    def refine_all(self) -> None:
        """Refine every block once, in order (:meth:`refine`: a sweep at a fifteenth of :meth:`sweep`'s cost)."""
        for i in range(len(self.windows)):
            self.refine(i)

    def converge(self, most: int = 1000, tolerance: float = 1e-4) -> None:
        """Refine every block in turn until a sweep lowers the squared error by less than ``tolerance`` of
        it: overlapping blocks pass error back and forth between them, so this takes hundreds of sweeps
        (five overlapping rank-10 blocks on their true windows: 0.060 relative error after 30 sweeps of
        :meth:`refine`, near the noise, 0.0035, after 300; ``benchmarks/structure_discovery.py --sweeps``).
        Cheap per sweep, it suits the many short refits that judge a trial change; sweeps slow down in
        long flat stretches where this rule stops them far from the fit's error (blocks on the true windows
        of seeds 17 and 18 at 0.0050 and 0.0099 with ``tolerance=1e-6``), so a converged fit is
        :meth:`converge_jointly`'s job (0.0027 on both)."""
        error = squared_norm(self.residual)
        for _ in range(most):
            self.refine_all()
            previous, error = error, squared_norm(self.residual)
            if previous - error <= tolerance * previous:
                break

    def converge_jointly(self, most: int = 300, tolerance: float = 1e-6) -> None:
        """Refit all blocks together (:class:`JointSolve`) until a step lowers the squared error by less
        than ``tolerance`` of it, at most ``most`` steps. A block never fitted, or whose rank or window
        changed since its last fit, is first refitted alone."""
        for i in range(len(self.windows)):
            if self._stale(i):
                self.refit(i)
        if not any(window[4] for window in self.windows):
            return
        solve = JointSolve(self)
        for _ in range(most):
            previous = solve.error
            solve.step()
            if previous - solve.error <= tolerance * previous:
                break
        solve.write_back()

    @classmethod
    def fitted(cls, target: torch.Tensor, windows: list[list[int]], starts: tuple[int, ...] = (1, 10),
               most: int = 2000, tolerance: float = 1e-6) -> BlockFit:
        """A fresh fit of blocks on ``windows``, refitted together (:meth:`converge_jointly`, ``most`` steps
        and ``tolerance``) after each number in ``starts`` of sweeps of one-block-at-a-time refits; the
        fit that leaves the least error. The joint refit is local: from one sweep it stalled on the true
        windows of 2 of 19 hidden-block matrices in one of 3 block orders (0.011 and 0.039 against the
        noise, 0.0027), all at the noise from 10 sweeps; on 40 smaller ones in 4 orders, 10 sweeps stalled
        once (0.047) where one sweep did not. Further sweeps or steps from a stalled fit did not leave it."""
        fits = []
        for sweeps in starts:
            fits.append(cls(target, [list(window) for window in windows]))
            fits[-1].converge(most=sweeps, tolerance=0.0)
            fits[-1].converge_jointly(most=most, tolerance=tolerance)
        return min(fits, key=lambda fit: squared_norm(fit.residual))

    def captured(self, window, rank: int) -> float:
        """Squared error a rank-``rank`` block on ``window`` would remove from the residual: its leading
        eigenvalues of the smaller Gram matrix (faster than singular values, the same sum)."""
        region = self.residual[self._where(window)]
        gram = region.mT @ region if region.shape[1] <= region.shape[0] else region @ region.mT
        return float(torch.linalg.eigvalsh(gram)[-rank:].sum()) if rank else 0.0

    def cost(self) -> int:
        return sum(block_macs(window) for window in self.windows)

    def pieces(self) -> list[tuple[int, int, int, int, torch.Tensor, torch.Tensor]]:
        """Every block as rank-1 pieces ``(row, height, col, width, left, right)``."""
        found = []
        for window, fit in zip(self.windows, self.fits):
            if window[4] and fit is not None:
                u, s, vh = thin_svd(fit)
                found += [(*window[:4], u[:, k] * s[k], vh[k]) for k in range(min(window[4], len(s)))]
        return found


class JointSolve:
    """All blocks of a :class:`BlockFit` as one pair of factors, ``left`` (rows x total rank) and
    ``right`` (columns x total rank), zero outside each block's windows, so that ``left @ right.mT`` is
    the fit; refined by alternating least squares. Rows covered by the same blocks share one small
    least-squares problem (at most twice the number of blocks plus one such groups per side, solved as
    one batch: :class:`_CoverGroups`), whose normal equations are slices of ``target @ right`` and
    ``right.mT @ right``. Each step is followed by an extrapolation along the direction it moved,
    ``beta`` times as far, kept when it lowers the error further; ``beta`` grows by half after a kept one
    and halves after one that is not (overlapping blocks converge along a narrow valley, where plain
    alternating steps shrink as they go). Errors come from the factors' products with the target and
    their Gram matrices, so a step costs two products with the target and never forms the residual."""

    def __init__(self, blocks: BlockFit) -> None:
        self.blocks, target = blocks, blocks.target
        (m, n), total = target.shape, sum(window[4] for window in blocks.windows)
        self.left, self.right = target.new_zeros(m, total), target.new_zeros(n, total)
        self.spans, k = [], 0
        for i, window in enumerate(blocks.windows):
            rows, cols, rank = cyclic_window(window[0], window[1], m), cyclic_window(window[2], window[3], n), window[4]
            basis = blocks._bases.get(i)
            if rank and basis is not None:  # the fit is (fit @ basis) @ basis.mT: basis spans its rows
                used = slice(k, k + basis.shape[1])
                self.left[rows, used], self.right[cols, used] = blocks.fits[i] @ basis, basis
            self.spans.append((rows, cols, slice(k, k + rank)))
            k += rank
        self.row_groups = _CoverGroups([(rows, span) for rows, _, span in self.spans], m)
        self.col_groups = _CoverGroups([(cols, span) for _, cols, span in self.spans], n)
        self.target_norm = squared_norm(target)
        self.target_right = target @ self.right
        self.beta, self.error = 0.5, self._error(self.left, self.right, self.target_right)

    def _error(self, left: torch.Tensor, right: torch.Tensor, target_right: torch.Tensor) -> float:
        """``|target - left @ right.mT|^2`` given ``target_right = target @ right``."""
        return self.target_norm - 2 * float((left * target_right).sum()) + float(((left.mT @ left) * (right.mT @ right)).sum())

    def step(self) -> None:
        """One alternating step (left given right, then right given left), then the extrapolation."""
        target = self.blocks.target
        left = self.row_groups.solved(self.target_right, self.right)
        right = self.col_groups.solved(target.mT @ left, left)
        target_right, beta = target @ right, self.beta
        error = self._error(left, right, target_right)
        far_left, far_right = left + beta * (left - self.left), right + beta * (right - self.right)
        far_target_right = target_right + beta * (target_right - self.target_right)
        far_error = self._error(far_left, far_right, far_target_right)
        if far_error < error:
            left, right, target_right, error = far_left, far_right, far_target_right, far_error
            self.beta = min(8.0, 1.5 * beta)
        else:
            self.beta = max(0.1, beta / 2)
        self.left, self.right, self.target_right, self.error = left, right, target_right, error

    def write_back(self) -> None:
        """Give the blocks their fits, the residual and the bases :meth:`BlockFit.refine` starts from."""
        blocks = self.blocks
        for i, (rows, cols, span) in enumerate(self.spans):
            right = self.right[cols, span]
            blocks.fits[i] = self.left[rows, span] @ right.mT
            if span.stop > span.start:
                blocks._bases[i] = torch.linalg.qr(right).Q
        blocks.residual = blocks.target - self.left @ self.right.mT


class _CoverGroups:
    """The rows (or columns) of one side of a :class:`JointSolve` grouped by the blocks that cover them,
    padded into one batch: ``cells`` (groups x most factor columns x most rows) and ``pairs`` (groups x
    most factor columns x same) are flat indices into the factor and its Gram matrix, each grown by one
    zero row and column where the padding points. One batched solve of all groups costs a handful of
    operations where a loop over groups cost a few per group."""

    packed = 62  # the most blocks whose flags fit one int64 per row

    def __init__(self, covers: list[tuple[torch.Tensor, slice]], length: int) -> None:
        """``covers``: each block's window on this side and its factor columns."""
        spans = [span for _, span in covers]
        self.length, self.total = length, spans[-1].stop if spans else 0
        membership = torch.zeros(length, len(spans), dtype=torch.bool)
        for b, (window, span) in enumerate(covers):
            membership[window, b] = span.stop > span.start  # a block without ranks adds no unknowns
        if len(spans) <= self.packed:  # each row's flags as one integer: unique over those is far faster
            codes, which, sizes = torch.unique((membership.long() << torch.arange(len(spans))).sum(1),
                                               return_inverse=True, return_counts=True)
            keys = codes.unsqueeze(1) >> torch.arange(len(spans)) & 1
        else:
            keys, which, sizes = torch.unique(membership, dim=0, return_inverse=True, return_counts=True)
        order = torch.argsort(which, stable=True)
        firsts = torch.cumsum(sizes, 0) - sizes
        rows = torch.full((len(keys), int(sizes.max()) if length else 0), length)
        rows[which[order], torch.arange(length) - firsts[which[order]]] = order
        columns = [[c for b, span in enumerate(spans) if key[b] for c in range(span.start, span.stop)]
                   for key in keys.tolist()]
        used = [g for g, key in enumerate(columns) if key]  # rows no block covers stay zero
        most = max((len(columns[g]) for g in used), default=0)
        columns = torch.tensor([columns[g] + [self.total] * (most - len(columns[g])) for g in used],
                               dtype=torch.long).reshape(len(used), most, 1)
        self.cells = rows[used].unsqueeze(1) * (self.total + 1) + columns
        self.pairs = columns * (self.total + 1) + columns.mT
        self.padding = torch.diag_embed((columns.squeeze(2) == self.total).double())

    def solved(self, products: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """The factor that best fits the target given the ``other`` factor: ``products`` is the target (or
        its transpose) times ``other``. Each group of rows is a least-squares problem over the columns of
        ``other`` that cover it; as ``other`` is zero outside its windows, its normal equations are slices
        of ``products`` and of ``other``'s Gram matrix (a tiny ridge keeps unused ranks solvable; padded
        columns get an identity and a zero right-hand side, so they solve to zero)."""
        found = products.new_zeros(self.length + 1, self.total + 1)
        if not self.cells.numel():
            return found[:-1, :-1]
        gram = torch.nn.functional.pad(other.mT @ other, (0, 1, 0, 1))
        normal = gram.take(self.pairs)
        ridge = 1e-12 * normal.diagonal(dim1=1, dim2=2).sum(1) + torch.finfo(gram.dtype).tiny
        normal += self.padding.to(gram.dtype) + torch.diag_embed(ridge.unsqueeze(1).expand(-1, normal.shape[1]))
        wanted = torch.nn.functional.pad(products, (0, 1, 0, 1)).take(self.cells)
        # the normal matrices' inverses times the right-hand sides: one batched product, where batched
        # triangular solves of these sizes ran several times slower
        factor, failed = torch.linalg.cholesky_ex(normal)
        solution = torch.cholesky_inverse(factor) @ wanted if not failed.any() else torch.linalg.solve(normal, wanted)
        found.view(-1).put_(self.cells, solution)
        return found[:-1, :-1]


def block_macs(window) -> int:
    """MACs per token of a block on ``window`` (``[row start, height, col start, width, rank]``)."""
    return window[4] * (window[1] + window[3])


def squared_norm(residual: torch.Tensor) -> float:
    return float(residual.square().sum())
