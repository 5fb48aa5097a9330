import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gblr import GBLRLinear
from gblr.cost import cost_report
from gblr.structured.gblr_special import gblr_block_sparse, gblr_lowrank


def flops_of(model, x):
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return counter.get_total_flops()


def test_effective_cost_not_masked_matmul():
    torch.manual_seed(0)
    low = gblr_lowrank(torch.randn(64, 4), torch.randn(32, 4))
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), low, nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(5, 7, 16)
    report = cost_report(model, x)
    tokens = 5 * 7
    assert [c.name for c in report.layers] == ["2"]
    assert report.layers[0].tokens == tokens
    assert report.layers[0].macs_per_token == 4 * (64 + 32)
    assert report.other_flops == 2 * tokens * (16 * 32 + 64 * 10)
    assert report.structured_flops == 2 * tokens * 4 * (64 + 32)
    # The reference is exactly what FlopCounterMode says of the same model with a dense layer.
    dense = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    assert report.dense_total_flops == flops_of(dense, x)
    assert report.structured_fraction == pytest.approx(4 * 96 / (64 * 32))
    markdown = report.to_markdown()
    assert "| 2 | GBLRLinear | 32 | 64 |" in markdown and "whole model" in markdown


def test_masked_training_forward_is_not_reported_as_the_cost():
    weight = torch.randn(64, 64)
    pattern = torch.eye(4, dtype=torch.bool)
    model = nn.Sequential(gblr_block_sparse(weight, (16, 16), pattern))
    x = torch.randn(10, 64)
    report = cost_report(model, x)
    assert report.structured_flops == 2 * 10 * 4 * 16 * 16
    assert flops_of(model, x) > 3 * report.structured_flops  # what the masked forward runs


def test_model_is_restored_after_report():
    model = nn.Sequential(GBLRLinear(8, 8), nn.Linear(8, 2))
    layer = model[0]
    cost_report(model, torch.randn(2, 8))
    assert model[0] is layer


def test_inactive_components_are_free():
    u, v = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    layer = GBLRLinear.from_intervals([(0, 8), (3, 0)], [(4, 4), (0, 16)], u, v)
    assert layer.active_components().tolist() == [True, False]
    assert layer.macs_per_token() == 8 + 4
    square = GBLRLinear.from_intervals([(0, 2), (0, 0)], [(0, 2), (0, 0)], u, v)
    assert square.macs_per_token() == 2 * 2  # a block cheaper as dense counts as dense
