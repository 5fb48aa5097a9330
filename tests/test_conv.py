"""Structured convolutions: same outputs as nn.Conv2d, cost per output pixel, conversion, compact, save/load."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gblr
from gblr.convert import UNSUPPORTED, ConvertConfig, convert_
from gblr.cost import cost_report
from gblr.learn import StructureLearner, param_groups
from gblr.structured import DenseLinear, GBLRLinear, StructuredConv2d
from gblr.structured.conv import conv_matrices
from gblr.train import load_config

GEOMETRIES = [  # (in, out, kernel, stride, padding, dilation, bias)
    (3, 8, 3, 1, 1, 1, True),
    (4, 6, (3, 2), 2, (0, 1), 1, False),
    (5, 7, 3, (2, 1), 2, 2, True),
    (2, 4, 1, 1, 0, 1, True),
    (3, 5, 3, 1, "same", 2, True),
    (3, 5, 2, 1, "valid", 1, True),
]


def _model(geometry):
    cin, cout, kernel, stride, padding, dilation, bias = geometry
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias))


@pytest.mark.parametrize("layout", ["matrix", "taps"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_dense_family_convolution_equals_conv2d_in_both_executions(geometry, layout):
    torch.manual_seed(0)
    reference = _model(geometry).double()
    x = torch.randn(2, geometry[0], 11, 9, dtype=torch.double)
    model = copy.deepcopy(reference)
    report = convert_(model, ConvertConfig("dense", 1.0, conv_layout=layout))
    assert [r.name for r in report.replaced] == ["0"] and isinstance(model[0], StructuredConv2d)
    expected = reference(x)
    torch.testing.assert_close(model(x), expected)  # the convolution with the layers' weight
    torch.testing.assert_close(model(x[0]), expected[0])  # unbatched input
    torch.testing.assert_close(model[0].to_dense(), reference[0].weight)
    for layer in model[0].linears:  # the layers multiplying unfolded patches (what compact layers do)
        layer.executes_structure = True
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("layout", ["matrix", "taps"])
def test_cost_is_counted_per_output_pixel_and_agrees_with_flop_counter(layout):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, dilation=2))
    x = torch.randn(2, 3, 17, 15)
    counter = FlopCounterMode(display=False)
    with counter:
        reference(x)
    dense = copy.deepcopy(reference)
    convert_(dense, ConvertConfig("dense", 1.0, conv_layout=layout))
    assert cost_report(dense, x).total_flops == counter.get_total_flops()
    structured = copy.deepcopy(reference)
    convert_(structured, ConvertConfig("lowrank", 0.5, conv_layout=layout))
    report = cost_report(structured, x)
    pixels = {"0": 2 * 9 * 8, "2": 2 * 5 * 4}  # output pixels of each convolution
    for layer in report.layers:
        conv = layer.name.split(".")[0]
        assert layer.tokens == pixels[conv]
    for conv, pixel_count in pixels.items():
        expected = 2 * pixel_count * structured.get_submodule(conv).macs_per_pixel()
        assert sum(layer.flops for layer in report.layers if layer.name.startswith(f"{conv}.")) == expected
        assert structured.get_submodule(conv).relative_cost() <= 0.5


def test_convert_reports_unsupported_layer_types_and_respects_the_filter():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv1d(4, 4, 3), nn.Conv2d(4, 8, 3, padding_mode="reflect"),
                          nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 8))
    report = convert_(model, ConvertConfig("lowrank", 0.5, init="random"), filter_fn=lambda m, name: name != "4")
    assert [r.name for r in report.replaced] == ["3", "5"]
    reasons = dict(report.skipped)
    assert reasons["0"] == UNSUPPORTED + "Conv2d with groups=2 (only groups=1 is supported)"
    assert reasons["1"] == UNSUPPORTED + "Conv1d"
    assert reasons["2"].startswith(UNSUPPORTED + "Conv2d with padding_mode='reflect'")
    assert reasons["4"] == "excluded by the filter"
    assert report.failed == []  # skipped by type or filter is not a failure
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[3], StructuredConv2d)


@pytest.mark.parametrize("layout", ["matrix", "taps"])
def test_from_dense_projects_each_matrix_of_the_layout(layout):
    torch.manual_seed(0)
    reference = _model((4, 6, 3, 1, 1, 1, True)).double()
    weight = reference[0].weight.detach()
    model = copy.deepcopy(reference)
    report = convert_(model, ConvertConfig("lowrank", 0.5, conv_layout=layout))
    matrices = conv_matrices(weight, layout)
    assert len(matrices) == (1 if layout == "matrix" else 9)
    # the truncated SVD of every matrix, at the rank the budget gives each
    residual = sum(torch.linalg.svdvals(m)[layer.rank:].square().sum() for m, layer in zip(matrices, model[0].linears))
    assert report.replaced[0].relative_error == pytest.approx(float(residual.sqrt() / weight.norm()))
    assert [layer.bias is not None for layer in model[0].linears] == [True] + [False] * (len(matrices) - 1)
    torch.testing.assert_close(model[0].linears[0].bias, reference[0].bias)
    fitted = copy.deepcopy(reference)
    report = convert_(fitted, ConvertConfig("gblr", 0.5, conv_layout=layout, options={"steps": 0}))
    assert 0 < report.replaced[0].relative_error < 1 and fitted[0].relative_cost() <= 0.5


@pytest.mark.parametrize("layout", ["matrix", "taps"])
def test_compact_and_save_load_round_trip(layout, tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False))
    model = copy.deepcopy(base)
    convert_(model, ConvertConfig("gblr", 0.5, conv_layout=layout, options={"steps": 0}))
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    fast = gblr.compact(model)
    assert all(layer.executes_structure for layer in fast[0].linears)
    torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
    gblr.save(model, tmp_path / "saved")
    loaded = gblr.load(tmp_path / "saved", copy.deepcopy(base)).eval()
    assert isinstance(loaded[2], StructuredConv2d) and loaded[2].layout == layout
    torch.testing.assert_close(loaded(x), expected)


def test_loading_into_a_different_convolution_is_a_one_line_error(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    convert_(model, ConvertConfig("lowrank", 0.5))
    gblr.save(model, tmp_path / "saved")
    for other, message in ((nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2)), "convolution '0' is saved as"),
                           (nn.Sequential(nn.Linear(27, 8)), "convolution '0' is saved as"),
                           (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1, padding_mode="circular")),
                            "convolution '0' is saved as")):
        with pytest.raises(ValueError, match=message) as error:
            gblr.load(tmp_path / "saved", other)
        assert "\n" not in str(error.value)
    assert isinstance(other[0], nn.Conv2d)  # nothing was replaced


def test_mismatched_layers_are_refused():
    with pytest.raises(ValueError, match="needs structured layers"):
        StructuredConv2d(3, 8, 3, [DenseLinear(9, 8)])
    with pytest.raises(ValueError, match="only the first tap"):
        StructuredConv2d(3, 8, (1, 2), [DenseLinear(3, 8), DenseLinear(3, 8)], layout="taps")
    with pytest.raises(ValueError, match="layout"):
        StructuredConv2d(3, 8, 1, [DenseLinear(3, 8)], layout="rows")
    with pytest.raises(ValueError, match="padding must be an integer >= 0"):
        StructuredConv2d(3, 8, 1, [DenseLinear(3, 8)], padding=-1)
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        StructuredConv2d(3, 8, 1, [DenseLinear(3, 8)], stride=(1, 0))
    with pytest.raises(ValueError, match="conv_layout must be one of"):
        ConvertConfig("gblr", 0.5, conv_layout="rows")
    with pytest.raises(ValueError, match="structure.conv_layout"):
        load_config(None, ['structure.conv_layout="rows"'])


def _learn_structure(model, x, target: float, steps: int, tokens: dict):
    """``steps`` optimizer steps on a toy loss with the structure learner holding ``target``; returns the
    optimizer and the learner's last statistics."""
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3))
    learner = StructureLearner(model, optimizer, target=target, total_steps=steps, ramp=(0.0, 0.5), tokens=tokens)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        stats = learner.step()
    return optimizer, stats


def test_learner_budget_counts_flops_when_layers_see_different_token_counts():
    # conv "0" sees 4x the output pixels of conv "2": with the tokens given, the budget is a share of FLOPs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    convert_(model, ConvertConfig("gblr", 1.0, init="random"))
    x = torch.randn(4, 8, 12, 12)
    tokens = {layer.name: layer.tokens for layer in cost_report(model, x[:1]).layers}
    assert tokens == {"0.linears.0": 144, "2.linears.0": 36}
    optimizer, stats = _learn_structure(model, x, target=0.4, steps=20, tokens=tokens)
    fraction = cost_report(model.eval(), x[:1]).structured_fraction
    assert fraction == pytest.approx(float(stats["cost_fraction"]))
    assert 0.4 * 0.98 <= fraction <= 0.4
    with pytest.raises(ValueError, match="tokens must give"):
        StructureLearner(model, optimizer, target=0.4, total_steps=20, tokens={"0.linears.0": 144})
    assert all(isinstance(layer, GBLRLinear) for layer in model[0].linears)


@pytest.mark.parametrize("family", sorted(gblr.structured.FAMILIES))
@pytest.mark.parametrize("layout", ["matrix", "taps"])
def test_every_family_structures_a_convolution(family, layout):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    x = torch.randn(2, 16, 8, 8)
    budget = 1.0 if family == "dense" else 0.5
    report = convert_(model, ConvertConfig(family, budget, init="random", conv_layout=layout))
    assert report.failed == [] and isinstance(model[0], StructuredConv2d)
    assert model(x).shape == (2, 32, 8, 8)
    assert model[0].relative_cost() <= budget
    model(x).sum().backward()  # trainable through the convolution with the layers' weight
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


@pytest.mark.parametrize("layout", ["matrix", "taps"])
def test_gblr_conv2d_is_a_drop_in_that_learns_its_structure(layout, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(gblr.GBLRConv2d(3, 16, 3, stride=2, padding=1, layout=layout), nn.ReLU(),
                          gblr.GBLRConv2d(16, 8, (3, 1), padding=(1, 0), bias=False, layout=layout))
    x = torch.randn(4, 3, 12, 12)
    reference = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 8, (3, 1), padding=(1, 0)))
    assert model(x).shape == reference(x).shape
    tokens = {layer.name: layer.tokens for layer in cost_report(model, x[:1]).layers}
    _learn_structure(model, x, target=0.5, steps=10, tokens=tokens)
    assert cost_report(model.eval(), x[:1]).structured_fraction <= 0.5
    gblr.save(model, tmp_path / "saved")
    loaded = gblr.load(tmp_path / "saved", copy.deepcopy(reference)).eval()
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CI has no GPU)")
@pytest.mark.parametrize("layout", ["matrix", "taps"])
def test_structured_convolution_on_cuda_matches_the_cpu(layout):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    convert_(model, ConvertConfig("gblr", 0.4, conv_layout=layout, options={"steps": 0}))
    model.eval()
    x = torch.randn(8, 16, 32, 32)
    expected = model(x)
    on_gpu = copy.deepcopy(model).cuda()
    torch.testing.assert_close(on_gpu(x.cuda()).cpu(), expected, atol=1e-4, rtol=1e-4)
    fast = gblr.compact(on_gpu)  # the compact layers run on the unfolded patches, on the GPU
    torch.testing.assert_close(fast(x.cuda()).cpu(), expected, atol=1e-4, rtol=1e-4)
