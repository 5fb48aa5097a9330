"""Block pursuit: windows found anywhere in a dense matrix (gblr.discover)."""

import pytest
import torch

from gblr.demos.overlapping_blocks import overlapping_blocks
from gblr.block_fit import BlockFit, squared_norm
from gblr.discover import (_agreed_blocks, _best_window, _cyclic_union, _edge_seeds, _edge_windows, _improved,
                           _only_noise_left, _polished, _ranked, _read_edges, _regrown, _swapped, _trimmed,
                           block_pursuit)
from gblr.fit import fit_gblr, relative_error, structured_from_dense


def test_best_window_is_the_best_cyclic_window():
    torch.manual_seed(0)
    energy = torch.rand(13, dtype=torch.float64) ** 4
    start, size, ratio = _best_window(energy, other_side=5)
    brute = max(((s, z, float(energy[(s + torch.arange(z)) % 13].sum()) / (z + 5)) for s in range(13) for z in range(1, 14)),
                key=lambda t: t[2])
    assert (start, size) == brute[:2] and ratio == pytest.approx(brute[2])


def test_pursuit_finds_hidden_blocks_that_tilings_and_low_rank_miss():
    weight, _ = overlapping_blocks(0, rows=100, cols=160, blocks=5, rank=5)
    layer = block_pursuit(weight.float(), 0.25)
    assert layer.relative_cost() <= 0.25
    found = relative_error(layer.to_dense(), weight)
    low_rank = relative_error(structured_from_dense("lowrank", weight.float(), 0.25).to_dense(), weight)
    assert found <= 0.5 * low_rank, (found, low_rank)
    x = torch.randn(4, 160)
    assert torch.allclose(layer(x), x @ layer.to_dense().T, atol=1e-4)
    # as a candidate of the GBLR fit it wins here, and the fit is never worse than without it
    with_pursuit = fit_gblr(weight.float(), 0.25, steps=0, pursuit=True)
    without = fit_gblr(weight.float(), 0.25, steps=0)
    assert with_pursuit.fit_method == "block pursuit"
    assert relative_error(with_pursuit.to_dense(), weight) < relative_error(without.to_dense(), weight)


def test_blocks_have_the_asked_cost_and_noise():
    weight, windows = overlapping_blocks(3, rows=50, cols=80, blocks=4, rank=2, cost=0.2, noise=0.01)
    assert len(windows) == 4 and weight.shape == (50, 80)
    assert sum(2 * (h + w) for _, h, _, w in windows) == pytest.approx(0.2 * 50 * 80, rel=0.05)


def test_pursuit_below_one_piece_is_a_clear_error():
    with pytest.raises(ValueError, match="below the cost of one rank-1 piece"):
        block_pursuit(torch.randn(20, 30), 0.001)


def test_consolidated_blocks_reach_the_noise_level_the_pieces_alone_miss():
    weight, _ = overlapping_blocks(0, rows=100, cols=160, blocks=4, rank=4, noise=0.003)
    pieces_only = relative_error(block_pursuit(weight, 0.25, overlaps=(), edges=False).to_dense(), weight)
    layer = block_pursuit(weight, 0.25)
    found = relative_error(layer.to_dense(), weight)
    assert layer.relative_cost() <= 0.25
    assert found < 0.006 and pieces_only > 10 * found, (found, pieces_only)


def test_cyclic_union_is_the_shortest_window_holding_both():
    assert _cyclic_union((10, 20), (25, 10), 100) == (10, 25)
    assert _cyclic_union((25, 10), (10, 20), 100) == (10, 25)
    assert _cyclic_union((90, 20), (5, 10), 100) == (90, 25)  # across the end
    assert _cyclic_union((0, 60), (50, 60), 100) == (0, 100)  # the whole circle at most


def test_edges_are_read_where_blocks_begin_and_end():
    generator = torch.Generator().manual_seed(0)
    weight = 1e-4 * torch.randn(100, 120, dtype=torch.float64, generator=generator)
    for (r0, h, c0, w) in [(10, 30, 0, 60), (50, 40, 70, 50)]:
        weight[r0:r0 + h, c0:c0 + w] += torch.randn(h, 3, generator=generator, dtype=torch.float64) @ torch.randn(
            3, w, generator=generator, dtype=torch.float64)
    rows = _edge_windows(weight, factor=20.0, lookback=80, shortest=10, most=12)
    cols = _edge_windows(weight.mT, factor=20.0, lookback=80, shortest=10, most=12)
    assert {(10, 30), (50, 40)} <= set(rows) and {(0, 60), (70, 50)} <= set(cols)
    assert len(rows) < 10 and len(cols) < 10  # starts 0, 10, 50 and ends 40, 90, 100: nothing else stands out


def test_no_edges_in_a_matrix_without_blocks():
    weight = torch.randn(60, 90, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert _edge_seeds(weight, 0.3, _read_edges(weight)) == []


def test_edge_seeds_lower_the_error_at_exactly_the_blocks_cost():
    weight, _ = overlapping_blocks(3, rows=100, cols=160, blocks=4, rank=4, noise=0.003)
    seeds = _edge_seeds(weight, 0.175, _read_edges(weight))
    assert sum(rank * (h + w) for _, h, _, w, rank in seeds) <= 0.175 * weight.numel()
    without = relative_error(block_pursuit(weight, 0.175, edges=False).to_dense(), weight)
    layer = block_pursuit(weight, 0.175)
    assert layer.relative_cost() <= 0.175
    assert relative_error(layer.to_dense(), weight) < 0.75 * without


def test_edge_seeds_use_the_windows_they_are_given():
    weight, windows = overlapping_blocks(0, rows=100, cols=160, blocks=3, rank=4, cost=0.1)
    rows, cols = [(r, h) for r, h, _, _ in windows], [(c, w) for _, _, c, w in windows]
    seeds = _edge_seeds(weight, 0.1, (rows, cols))
    assert seeds and all((r, h) in rows and (c, w) in cols for r, h, c, w, _ in seeds)
    assert sum(rank * (h + w) for _, h, _, w, rank in seeds) <= 0.1 * 100 * 160


def test_agreed_blocks_sit_on_the_median_edges_of_three_or_more_pieces():
    block = [(10, 40, 20, 60), (12, 38, 20, 60), (10, 40, 22, 55), (10, 39, 20, 60)]  # trimmed pieces of one block
    strays = [(100, 20, 100, 30), (101, 19, 100, 30)]  # two pieces agree on a window elsewhere: not enough
    pieces = [(*window, None, None) for window in block + strays]
    assert _agreed_blocks(pieces, 0.85, (200, 320)) == [[10, 40, 20, 60, 4]]
    assert _agreed_blocks(pieces, 0.85, (200, 320), least=2) == [[10, 40, 20, 60, 4], [101, 19, 100, 30, 2]]  # upper medians


def assert_found_the_blocks(fit: BlockFit, weight: torch.Tensor, windows: list, allowed: float) -> None:
    assert fit.cost() <= allowed
    assert float(fit.residual.norm() / weight.norm()) < 0.006  # the noise, 0.003
    assert sorted(w[:4] for w in fit.windows) == sorted(list(w) for w in windows)


def test_trimming_meets_the_budget_and_keeps_the_blocks():
    weight, windows = overlapping_blocks(1, rows=100, cols=160, blocks=4, rank=4, noise=0.003)
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    grown = [[*w, 4] for w in windows]
    grown[1][4] += 1  # a rank too many
    grown[2][2:4] = [grown[2][2] - 2, grown[2][3] + 2]  # two columns too many
    blocks = BlockFit(weight, grown)
    blocks.converge()
    trimmed = _trimmed(blocks, allowed)
    assert allowed < blocks.cost()
    assert_found_the_blocks(trimmed, weight, windows, allowed)


def test_a_little_room_then_trimming_finds_an_edge_that_improving_at_the_budget_misses():
    weight, windows = overlapping_blocks(1, rows=100, cols=160, blocks=3, rank=4, cost=0.1, noise=0.003)
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    shifted = [[*w, 4] for w in windows]
    shifted[0][1] -= 4  # block 0 misses its last 4 rows
    blocks = BlockFit(weight, shifted)
    blocks.converge()
    start = float(blocks.residual.norm() / weight.norm())
    at_budget = _improved(blocks.copy(), allowed)
    assert 0.1 < float(at_budget.residual.norm() / weight.norm()) <= start  # never worse, but stuck
    assert at_budget.cost() <= allowed
    roomier = _improved(blocks.copy(), 1.06 * allowed)
    found = _trimmed(roomier, allowed)
    assert_found_the_blocks(found, weight, windows, allowed)


def test_swapping_an_edge_between_two_blocks_fixes_a_row_given_to_the_wrong_one():
    weight, windows = overlapping_blocks(1, rows=100, cols=160, blocks=3, rank=4, cost=0.1, noise=0.003)
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    off = [[*w, 4] for w in windows]
    off[0][1] -= 1  # block 0 misses its last row, which block 1 spends on a row too many
    off[1][1] += 1
    blocks = BlockFit(weight, off)
    blocks.converge()
    assert blocks.cost() == allowed and float(blocks.residual.norm() / weight.norm()) > 0.01
    swapped = _swapped(blocks, allowed)
    assert_found_the_blocks(swapped, weight, windows, allowed)


def test_swapping_moves_several_rows_at_once_where_moving_one_at_a_time_raises_the_error():
    weight, windows = overlapping_blocks(2, rows=100, cols=160, blocks=3, rank=4, cost=0.1, noise=0.003)
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    off = [[*w, 4] for w in windows]
    off[0][1] -= 4  # block 0 misses its last four rows, which block 1 spends on four rows too many
    off[1][1] += 4
    blocks = BlockFit(weight, off)
    blocks.converge()
    assert blocks.cost() == allowed and float(blocks.residual.norm() / weight.norm()) > 0.1
    assert float(_swapped(blocks.copy(), allowed, steps=(1,)).residual.norm() / weight.norm()) > 0.1
    assert_found_the_blocks(_swapped(blocks, allowed), weight, windows, allowed)


def test_swapping_spends_spare_macs_on_a_row_a_block_lacks():
    weight, windows = overlapping_blocks(1, rows=100, cols=160, blocks=3, rank=4, cost=0.1, noise=0.003)
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    short = [[*w, 4] for w in windows]
    short[0][1] -= 1  # block 0 misses its last row, and the 4 MACs it would cost are unspent
    blocks = BlockFit(weight, short)
    blocks.converge()
    assert blocks.cost() == allowed - 4 and float(blocks.residual.norm() / weight.norm()) > 0.01
    assert_found_the_blocks(_swapped(blocks, allowed), weight, windows, allowed)
    assert _swapped(blocks, allowed - 4).cost() <= allowed - 4  # without them no move spends more


def test_polishing_refits_an_unconverged_fit_and_never_raises_its_error():
    weight, windows = overlapping_blocks(3, rows=100, cols=160, blocks=4, rank=4, noise=0.003)
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    blocks = BlockFit(weight, [[*w, 4] for w in windows])
    blocks.sweep()  # one sweep: overlapping blocks are far from converged
    before = float(blocks.residual.norm() / weight.norm())
    polished = _polished(blocks.copy(), allowed)
    assert float(polished.residual.norm() / weight.norm()) < min(0.006, before)
    converged = _polished(polished, allowed)
    assert float(converged.residual.norm()) <= float(polished.residual.norm())


def test_polishing_refits_from_two_starts_where_one_stalls():
    weight, _ = overlapping_blocks(18, rows=100, cols=160, blocks=4, rank=4, noise=0.003)
    windows = [[0, 100, 28, 75, 4], [3, 87, 38, 88, 4], [14, 77, 12, 98, 4], [15, 74, 6, 101, 4]]  # the true ones
    stalled = BlockFit(weight, windows)
    stalled.converge(most=10, tolerance=0.0)
    stalled.converge_jointly(most=2000)
    assert float(stalled.residual.norm() / weight.norm()) > 0.01  # far from the noise, 0.003, on exact windows
    polished = _polished(stalled.copy(), stalled.cost())
    assert float(polished.residual.norm() / weight.norm()) < 0.004
    assert [w[4] for w in polished.windows] == [4] * 4
    # from the start that stalled alone, trading ranks gets only part of the way
    one_start = _polished(stalled.copy(), stalled.cost(), starts=(10,))
    assert float(one_start.residual.norm()) > 1.5 * float(polished.residual.norm())


def test_polishing_passes_a_rank_to_the_block_that_lacks_it():
    weight, windows = overlapping_blocks(3, rows=100, cols=160, blocks=4, rank=4, noise=0.003)
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    by_size = sorted(range(4), key=lambda i: windows[i][1] + windows[i][3])
    wrong = [[*w, 4] for w in windows]
    wrong[by_size[0]][4], wrong[by_size[-1]][4] = 5, 3  # the smaller block holds a rank of the larger
    blocks = BlockFit(weight, wrong)
    blocks.converge()
    assert blocks.cost() <= allowed and float(blocks.residual.norm() / weight.norm()) > 0.01
    polished = _polished(blocks, allowed)
    assert_found_the_blocks(polished, weight, windows, allowed)
    assert [w[4] for w in polished.windows] == [4] * 4


def test_regrowing_returns_a_rank_whose_macs_another_block_spent_on_rows():
    weight, windows = overlapping_blocks(3, rows=100, cols=160, blocks=3, rank=4, cost=0.1, noise=0.003)
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    (_, h0, _, w0), (r1, _, _, _) = windows[:2]
    short = [[*w, 4] for w in windows]
    short[0][4] = 3  # block 0 lacks a rank; block 1 spends its MACs on rows above its window
    short[1][0], short[1][1] = r1 - (h0 + w0) // 4, short[1][1] + (h0 + w0) // 4
    blocks = BlockFit.fitted(weight, short)
    assert blocks.cost() <= allowed
    polished = _polished(_swapped(blocks, allowed), allowed)  # no edge or rank move finds it
    assert float(polished.residual.norm() / weight.norm()) > 0.1
    assert_found_the_blocks(_regrown(polished, allowed), weight, windows, allowed)


def test_trimming_drops_a_spare_block_whose_ranks_the_others_lack():
    weight, windows = overlapping_blocks(1, rows=100, cols=160, blocks=3, rank=4, cost=0.1, noise=0.003)
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    (r0, h0, c0, w0), (r1, h1, c1, w1) = windows[:2]
    spare = [min(r0, r1), max(r0 + h0, r1 + h1) - min(r0, r1), min(c0, c1), max(c0 + w0, c1 + w1) - min(c0, c1), 2]
    short = [[*windows[0], 3], [*windows[1], 3], [*windows[2], 4], spare]  # the spare holds a rank of each
    blocks = BlockFit(weight, short)
    blocks.converge()
    assert blocks.cost() > allowed
    assert_found_the_blocks(_trimmed(blocks, allowed), weight, windows, allowed)


def test_splitting_brings_two_nearly_coincident_blocks_merged_into_one_down_to_their_cost():
    generator = torch.Generator().manual_seed(0)
    weight = torch.zeros(60, 80, dtype=torch.float64)
    windows = [(2, 30, 4, 40), (4, 34, 2, 34)]  # the same rows and columns but for a few
    for r0, h, c0, w in windows:
        left, right = (torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in ((h, 4), (4, w)))
        weight[r0:r0 + h, c0:c0 + w] += left @ right / 2
    noise = torch.randn(60, 80, generator=generator, dtype=torch.float64)
    weight += 0.003 * weight.norm() / noise.norm() * noise
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    union = BlockFit(weight, [[2, 36, 2, 42, 8]])  # both blocks on one window: the noise, at more than their cost
    union.converge()
    assert union.cost() > allowed and float(union.residual.norm() / weight.norm()) < 0.006
    assert float(_trimmed(union.copy(), allowed, split=()).residual.norm() / weight.norm()) > 0.1  # ranks dropped
    assert_found_the_blocks(_trimmed(union, allowed, split=(4,)), weight, windows, allowed)


def test_ranked_blocks_keep_their_windows_within_the_budget():
    weight, windows = overlapping_blocks(2, rows=100, cols=160, blocks=3, rank=4, cost=0.1, noise=0.003)
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    for ranks in ([1, 1, 1], [3, 4, 4], [2, 2, 2]):
        blocks = _ranked(weight, [[*w, rank] for w, rank in zip(windows, ranks)], allowed)
        assert [w[:4] for w in blocks.windows] == [list(w) for w in windows]
        assert blocks.cost() <= allowed
        if ranks == [2, 2, 2]:  # balanced on two blocks that overlap on most rows: one rank lands on the wrong one ...
            blocks = _improved(blocks, allowed)  # ... which the verified rank trades that follow put right
        assert float(blocks.residual.norm() / weight.norm()) < 0.006  # every block's rank found again


def test_only_noise_left_tells_noise_from_a_block_part_above_it():
    generator = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn(100, 160, generator=generator, dtype=torch.float64)
    assert _only_noise_left(noise)
    edge = 0.01 * (100 ** 0.5 + 160 ** 0.5)
    part = torch.zeros_like(noise)  # a rank-1 sliver of a block on 8 rows and 40 columns, twice the noise's edge
    part[20:28, 50:90] = torch.outer(torch.ones(8), torch.ones(40)) * 2 * edge / (8 * 40) ** 0.5
    assert not _only_noise_left(noise + part)


def test_the_last_stage_is_skipped_where_only_noise_is_left(monkeypatch):
    import gblr.discover as discover
    weight, _ = overlapping_blocks(0, rows=100, cols=160, blocks=4, rank=4, noise=0.003)
    stages = []
    monkeypatch.setattr(discover, "_agreed_windows_refitted", lambda target, best, *rest: stages.append(best) or best)
    found = relative_error(block_pursuit(weight, 0.25).to_dense(), weight)
    assert found < 0.006 and not stages  # consolidation reached the noise: nothing left for the stage to find
    monkeypatch.setattr(discover, "_only_noise_left", lambda residual: False)
    block_pursuit(weight, 0.25)
    assert len(stages) == 1  # ... which it would otherwise have run


def test_the_last_stage_is_skipped_where_the_pieces_agree_on_no_windows(monkeypatch):
    import gblr.discover as discover
    monkeypatch.setattr(discover, "_only_noise_left", lambda residual: False)  # else skipped for noise alone
    improved = []
    monkeypatch.setattr(discover, "_improved", lambda blocks, allowed: improved.append(blocks) or blocks)
    block_pursuit(torch.randn(60, 90, generator=torch.Generator().manual_seed(0)), 0.25)  # no blocks to agree on
    assert not improved


def test_the_last_stage_passes_rows_between_the_regrown_fits_blocks(monkeypatch):
    import gblr.discover as discover
    weight, windows = overlapping_blocks(2, rows=100, cols=160, blocks=3, rank=4, cost=0.1, noise=0.003)
    allowed = sum(4 * (h + w) for _, h, _, w in windows)
    off = [[*w, 4] for w in windows]
    off[0][1] -= 12  # block 0 misses its last twelve rows, which block 1 spends on twelve rows too many
    off[1][1] += 12
    stuck = BlockFit.fitted(weight, off)
    assert float(stuck.residual.norm() / weight.norm()) > 0.1
    monkeypatch.setattr(discover, "_regrown", lambda blocks, allowed: stuck.copy())  # regrowing leaves it so
    found = discover._agreed_windows_refitted(weight, stuck.pieces(), squared_norm(stuck.residual),
                                              allowed / weight.numel(), 0.06, (0.85,))
    assert sorted({piece[:4] for piece in found}) == sorted(windows)
    assert len(found) == 12
