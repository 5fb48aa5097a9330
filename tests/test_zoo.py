"""Every structured family answers the same questions, meets budgets, and counts its cost honestly."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gblr.fit import relative_error, structured_from_dense
from gblr.structured import FAMILIES, family_names, make_structured

STRUCTURED = [name for name in family_names() if name != "dense"]
SHAPES = [(384, 384), (384, 1536), (1536, 384), (576, 192)]  # (in, out)
FAST = [name for name in STRUCTURED if name not in ("gblr", "blast")]  # gradient-based fits are slower


def counted_forward(layer):
    return layer.block_forward if layer.family == "gblr" else layer


@pytest.mark.parametrize("name", family_names())
def test_to_dense_equals_forward_on_identity(name):
    torch.manual_seed(0)
    budget = 1.0 if name == "dense" else 0.3
    layer = make_structured(name, 48, 80, budget, dtype=torch.float64)
    layer.eval()
    eye = torch.eye(48, dtype=torch.float64)
    bias = layer.bias if layer.bias is not None else 0
    assert torch.allclose(layer(eye) - bias, layer.to_dense().T, atol=1e-10)
    assert torch.allclose(counted_forward(layer)(eye) - bias, layer.to_dense().T, atol=1e-10)


@pytest.mark.parametrize("name", STRUCTURED)
@pytest.mark.parametrize("shape", SHAPES)
def test_budget_reached_from_below(name, shape):
    for budget in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        layer = make_structured(name, *shape, budget)
        cost = layer.relative_cost()
        assert cost <= budget + 1e-12, (name, shape, budget, cost)
        assert cost >= 0.9 * budget, (name, shape, budget, cost)


@pytest.mark.parametrize("name", STRUCTURED)
def test_counted_macs_match_flop_counter(name):
    torch.manual_seed(0)
    tokens = 256
    for in_features, out_features in [(384, 384), (384, 1536), (576, 192)]:
        layer = make_structured(name, in_features, out_features, 0.3)
        layer.eval()
        if name == "gblr":  # give it a structure with partial blocks, not only full-width components
            with torch.no_grad():
                k = layer.num_components
                layer.out_widths.copy_(torch.rand(k) * 0.5)
                layer.in_widths.copy_(torch.rand(k) * 0.5)
                layer.out_starts.copy_(torch.rand(k))
                layer.in_starts.copy_(torch.rand(k))
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            counted_forward(layer)(torch.randn(tokens, in_features))
        measured = counter.get_total_flops() / (2 * tokens)
        assert math.isclose(measured, layer.macs_per_token(), rel_tol=0.01), (name, measured, layer.macs_per_token())


@pytest.mark.parametrize("name", FAST + ["blast", "gblr"])
def test_projection_error_decreases_with_budget(name):
    torch.manual_seed(0)
    weight = torch.randn(96, 128, dtype=torch.float64)
    errors = []
    for budget in (0.1, 0.25, 0.5):
        layer = structured_from_dense(name, weight, budget)
        layer.eval()
        assert layer.relative_cost() <= budget
        errors.append(relative_error(layer.to_dense(), weight))
    assert errors[0] > errors[1] > errors[2], errors


def test_lowrank_projection_is_eckart_young_optimal():
    torch.manual_seed(0)
    weight = torch.randn(80, 120, dtype=torch.float64)
    singular = torch.linalg.svdvals(weight)
    layer = structured_from_dense("lowrank", weight, 0.3)
    error = (layer.to_dense() - weight).norm()
    assert torch.isclose(error, singular[layer.rank :].norm())


@pytest.mark.parametrize("name", ["blockdiag", "monarch"])  # exact projections
def test_projection_recovers_members_of_the_family(name):
    torch.manual_seed(0)
    member = make_structured(name, 64, 96, 0.3, dtype=torch.float64)
    weight = member.to_dense().detach()
    projected = structured_from_dense(name, weight, 0.3)
    assert torch.allclose(projected.to_dense(), weight, atol=1e-8)


def test_gblr_fit_finds_hidden_block_structure_that_lowrank_cannot():
    torch.manual_seed(0)
    weight = torch.zeros(64, 64, dtype=torch.float64)
    for i in range(4):  # block diagonal with 16x16 blocks: full rank, cost 0.25
        weight[16 * i : 16 * (i + 1), 16 * i : 16 * (i + 1)] = torch.randn(16, 16, dtype=torch.float64)
    gblr = structured_from_dense("gblr", weight, 0.5, steps=300)
    lowrank = structured_from_dense("lowrank", weight, 0.5)
    gblr.eval()
    gblr_error = relative_error(gblr.to_dense(), weight)
    lowrank_error = relative_error(lowrank.to_dense(), weight)
    assert gblr.relative_cost() <= 0.5
    assert gblr_error < 0.5 * lowrank_error, (gblr_error, lowrank_error)


def test_unknown_family_lists_known_ones():
    with pytest.raises(ValueError, match="known families: dense, lowrank, blockdiag, monarch"):
        make_structured("butterfly", 8, 8, 0.5)


@pytest.mark.parametrize("name", STRUCTURED)
def test_unreachable_budget_names_the_smallest(name):
    with pytest.raises(ValueError, match=r"smallest budget .* can reach .*: \d"):
        make_structured(name, 64, 64, 1e-4)


def test_bad_budget():
    for budget in (0.0, 1.5, float("nan"), "0.3"):
        with pytest.raises(ValueError, match="budget"):
            make_structured("lowrank", 8, 8, budget)


def test_registry_covers_every_family():
    assert set(FAMILIES) == {"dense", "lowrank", "blockdiag", "monarch", "pixelfly", "blast", "gblr"}


def test_monarch_any_shape_block_counts_and_rank():
    from gblr.structured import MonarchLinear

    torch.manual_seed(0)
    for in_features, out_features, blocks, out_blocks, rank in [(50, 70, 4, 7, 1), (96, 33, 8, 3, 3), (17, 64, 5, 5, 2)]:
        shape = {"num_blocks": blocks, "out_blocks": out_blocks, "rank": rank, "dtype": torch.float64}
        member = MonarchLinear(in_features, out_features, **shape)
        weight = member.to_dense().detach()
        blocks_of = weight.new_zeros(out_blocks * member.out_block, blocks * member.in_block)
        blocks_of[:out_features, :in_features] = weight
        tiles = blocks_of.reshape(out_blocks, member.out_block, blocks, member.in_block).permute(0, 2, 1, 3)
        assert int(torch.linalg.matrix_rank(tiles).max()) == rank  # every block has the rank asked for
        projected = MonarchLinear(in_features, out_features, **shape)
        with torch.no_grad():
            projected.project_(weight)
        assert torch.allclose(projected.to_dense(), weight, atol=1e-8)
        x = torch.randn(3, in_features, dtype=torch.float64)
        assert torch.allclose(projected(x) - projected.bias, x @ weight.T, atol=1e-8)
        assert member.macs_per_token() == blocks * out_blocks * rank * (member.in_block + member.out_block)
    with pytest.raises(ValueError, match="rank=9 must not exceed"):
        MonarchLinear(64, 64, num_blocks=8, rank=9)


def test_monarch_is_sized_with_about_sqrt_n_blocks():
    from gblr.structured import MonarchLinear

    for budget in (0.1, 0.3, 0.5):
        sizes = MonarchLinear.size_for_budget(384, 384, budget)
        assert 10 <= sizes["num_blocks"] <= 39 and sizes["out_blocks"] == sizes["num_blocks"]
    assert MonarchLinear.size_for_budget(384, 384, 0.5)["rank"] > 1


def test_gblr_fit_is_never_worse_than_lowrank():
    from gblr.fit import block_low_rank_fit

    torch.manual_seed(0)
    weight = torch.randn(80, 120, dtype=torch.float64)
    lowrank = structured_from_dense("lowrank", weight, 0.3)
    single_tile = block_low_rank_fit(weight, 0.3, grid=1)
    single_tile.eval()
    assert torch.allclose(single_tile.to_dense(), lowrank.to_dense(), atol=1e-10)
    gblr = structured_from_dense("gblr", weight, 0.3, steps=0)
    gblr.eval()
    assert (gblr.to_dense() - weight).norm() <= (lowrank.to_dense() - weight).norm() + 1e-10


@pytest.mark.parametrize("name", ["monarch", "pixelfly"])
def test_dense_execution_is_the_same_function(name):
    torch.manual_seed(0)
    layer = structured_from_dense(name, torch.randn(40, 24), 0.5)
    x = torch.randn(5, 24)
    runs = []
    for dense in (False, True):
        layer.dense_execution = dense
        layer.zero_grad()
        y = layer(x)
        (y * torch.arange(40.0)).sum().backward()
        runs.append((y.detach(), [p.grad.clone() for p in layer.parameters()]))
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(runs[0][1], runs[1][1]))


