"""Blocks on windows fitted together to a matrix (gblr.block_fit)."""

import pytest
import torch

from gblr.block_fit import BlockFit, JointSolve, _CoverGroups
from gblr.demos.overlapping_blocks import overlapping_blocks


def small_blocks(noise: float = 0.003):
    return overlapping_blocks(1, rows=100, cols=160, blocks=4, rank=4, noise=noise)


def test_refine_converges_to_the_same_fit_as_full_refits():
    weight, windows = small_blocks()
    exact, refined = BlockFit(weight, [[*w, 4] for w in windows]), BlockFit(weight, [[*w, 4] for w in windows])
    for _ in range(1000):
        exact.sweep()
    refined.converge(most=1000, tolerance=0.0)
    assert float(refined.residual.norm()) == pytest.approx(float(exact.residual.norm()), rel=1e-4)
    assert float(refined.residual.norm() / weight.norm()) < 0.006  # the noise, 0.003, not a poorer fixed point
    # a block whose shape changed since its last fit is refitted in full, not iterated from a stale basis
    refined.windows[0][4] = 3
    refined.refine(0)
    assert torch.linalg.matrix_rank(refined.fits[0]) == 3


def test_joint_refit_reaches_the_sweeps_fit_in_far_fewer_steps():
    weight, windows = small_blocks()
    swept, joint = BlockFit(weight, [[*w, 4] for w in windows]), BlockFit(weight, [[*w, 4] for w in windows])
    for _ in range(1000):
        swept.sweep()
    joint.converge_jointly(most=100, tolerance=0.0)
    assert float(joint.residual.norm()) == pytest.approx(float(swept.residual.norm()), rel=1e-4)
    # what it leaves is what its blocks leave: the residual, fits and bases agree
    rebuilt = weight.clone()
    for i, (window, fit) in enumerate(zip(joint.windows, joint.fits)):
        rebuilt[joint._where(window)] -= fit
        assert torch.linalg.matrix_rank(fit) == window[4]
        assert torch.allclose(fit @ joint._bases[i] @ joint._bases[i].mT, fit, atol=1e-10)  # the basis spans its rows
    assert torch.allclose(rebuilt, joint.residual, atol=1e-10)


def test_joint_steps_never_raise_the_error_and_fit_exact_blocks_exactly():
    weight, windows = small_blocks(noise=0.0)
    blocks = BlockFit(weight, [[*w, 4] for w in windows])
    blocks.sweep()
    solve, errors, scale = JointSolve(blocks), [], float(weight.square().sum())
    for _ in range(200):
        solve.step()
        errors.append(solve.error)
        # the error is read off products with the target: it agrees with the residual's to rounding
        assert solve.error == pytest.approx(float((weight - solve.left @ solve.right.mT).square().sum()), abs=1e-12 * scale)
    assert all(later <= earlier + 1e-13 * scale for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12 * scale


def test_joint_refit_leaves_uncovered_rows_and_rankless_blocks_alone_and_solves_without_cholesky(monkeypatch):
    weight, windows = small_blocks()
    windows = [[*w, 4] for w in windows] + [[0, 3, 0, 5, 0]]  # a block without ranks
    reference = BlockFit(weight, [list(w) for w in windows])
    for _ in range(1000):
        reference.sweep()
    joint = BlockFit(weight, [list(w) for w in windows])
    joint.converge_jointly(most=100, tolerance=0.0)
    assert float(joint.residual.norm()) == pytest.approx(float(reference.residual.norm()), rel=1e-4)
    covered = torch.zeros_like(weight, dtype=torch.bool)
    for window in windows[:-1]:
        covered[joint._where(window)] = True
    assert not covered.all() and torch.equal(joint.residual[~covered], weight[~covered])
    # where a Cholesky factorisation fails, the normal equations are solved by LU to the same fit
    failed = lambda normal: (normal, torch.ones(normal.shape[:-2], dtype=torch.int32))
    monkeypatch.setattr(torch.linalg, "cholesky_ex", failed)
    lu = BlockFit(weight, [list(w) for w in windows])
    lu.converge_jointly(most=100, tolerance=0.0)
    assert torch.allclose(lu.residual, joint.residual, atol=1e-9)


def test_rows_are_grouped_alike_with_flags_packed_into_integers_or_not(monkeypatch):
    weight, windows = small_blocks()
    blocks = BlockFit(weight, [[*w, 4] for w in windows] + [[0, 3, 0, 5, 0], [90, 20, 150, 20, 2]])  # rankless, wrapping
    blocks.sweep()
    packed = JointSolve(blocks)
    monkeypatch.setattr(_CoverGroups, "packed", 0)
    unpacked = JointSolve(blocks)
    def groups(side):  # each group's cells of the factor and of the Gram matrix, in any order
        return sorted((sorted(set(cells.flatten().tolist())), sorted(set(pairs.flatten().tolist())))
                      for cells, pairs in zip(side.cells, side.pairs))

    for a, b in ((packed.row_groups, unpacked.row_groups), (packed.col_groups, unpacked.col_groups)):
        assert len(groups(a)) >= 4 and groups(a) == groups(b)


def test_a_fresh_fit_starts_twice_keeps_the_lower_and_leaves_its_windows_alone():
    weight, _ = overlapping_blocks(18, rows=100, cols=160, blocks=4, rank=4, noise=0.003)
    windows = [[0, 100, 28, 75, 4], [3, 87, 38, 88, 4], [14, 77, 12, 98, 4], [15, 74, 6, 101, 4]]  # the true ones
    given = [list(window) for window in windows]
    both = BlockFit.fitted(weight, windows)
    alone = [float(BlockFit.fitted(weight, windows, starts=(sweeps,)).residual.norm()) for sweeps in (1, 10)]
    assert windows == given and not any(a is b for a, b in zip(both.windows, windows))  # copies, not the caller's
    assert float(both.residual.norm()) == min(alone)
    # from 10 sweeps the joint refit stalls far from the noise (0.003) on these exact windows; from 1 it does not
    assert float(both.residual.norm() / weight.norm()) < 0.004 < alone[1] / float(weight.norm())


@pytest.mark.parametrize("jointly", [False, True])
def test_converging_uses_a_rank_given_since_the_last_fit_and_windows_that_wrap(jointly):
    torch.manual_seed(0)
    weight = torch.zeros(40, 50, dtype=torch.float64)
    rows, cols = (torch.arange(30, 50) % 40).unsqueeze(1), torch.arange(45, 65) % 50  # wraps around both edges
    weight[rows, cols] = torch.randn(20, 3, dtype=torch.float64) @ torch.randn(3, 20, dtype=torch.float64)
    weight[5:25, 10:40] += torch.randn(20, 2, dtype=torch.float64) @ torch.randn(2, 30, dtype=torch.float64)
    blocks = BlockFit(weight, [[30, 20, 45, 20, 2], [5, 20, 10, 30, 2]])
    converge = blocks.converge_jointly if jointly else blocks.converge
    converge()
    short = float(blocks.residual.norm())
    blocks.windows[0][4] = 3  # as a rank trade leaves it: the window's fit is still of rank 2
    converge()
    assert short > 0.1 * float(weight.norm())
    assert float(blocks.residual.norm()) < 1e-6 * float(weight.norm())
