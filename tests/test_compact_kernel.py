"""The Triton execution of compact layers against the layer itself: on CUDA when there is one, else in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import pytest
import torch
from test_compact import random_structure

from gblr import GBLRLinear
from gblr import compact_kernel
from gblr.compact import CompactGBLRLinear

pytestmark = pytest.mark.skipif(compact_kernel.triton is None, reason="needs Triton (pip install triton)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(
    "options",
    [
        {"rank": 1},
        {"rank": 4, "tile": 8},  # low-rank and dense blocks, intervals wrapping around
        {"rank": 2, "bias": False},
        {"rank": 24, "num_components": 3},  # few wide blocks: several rank tiles per block
        {"rank": 16, "tile": 16, "num_components": 6},  # every offset a multiple of 16: aligned loads
    ],
)
@pytest.mark.parametrize("tokens", [1, 37, 130])
def test_kernel_computes_what_the_layer_computes(options, tokens):
    torch.manual_seed(0)
    options = {"num_components": 24, **options}
    layer = random_structure(GBLRLinear(96, 80, **options)).to(DEVICE)
    fast = CompactGBLRLinear(layer, calibrate=False)
    assert "kernel" in fast.executions() or DEVICE == "cpu"  # calibration considers it on CUDA only
    x = torch.randn(tokens, 96, device=DEVICE)
    with torch.no_grad():
        assert relative(fast.run(x, "kernel"), layer(x)) <= 1e-5
    aligned = fast._kernel_layout.steps(64, 16)[-1]
    assert aligned == (options.get("tile") == 16)


def test_both_kinds_of_blocks_and_every_tile_shape():
    u, v = torch.randn(3, 1, 40, dtype=torch.float64), torch.randn(3, 1, 40, dtype=torch.float64)
    # one rank-2 block 24 x 16 wrapping on both sides, one 2 x 2 block (dense), one full-height block
    layer = GBLRLinear.from_intervals([(30, 24), (30, 24), (3, 2)], [(36, 16), (36, 16), (0, 2)], u, v).float().eval()
    fast = CompactGBLRLinear(layer, calibrate=False).to(DEVICE)
    kinds = sorted(p.second is None for p in fast.slices)
    assert kinds == [False, True]
    x = torch.randn(70, 40, device=DEVICE)
    expected = layer.to(DEVICE)(x).detach()
    layout = compact_kernel.KernelLayout([(p.in_parts, p.out_parts, p.first, p.second) for p in fast.slices],
                                         40, 40, x.device, x.dtype)
    for tiles in (compact_kernel.Tiles(64, 16, 64, 32, 16), compact_kernel.Tiles(16, 32, 16, 16, 32), compact_kernel.Tiles(32, 16, 32, 64, 64)):
        assert relative(layout.run(x, fast.bias, tiles), expected) <= 1e-5, tiles


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_in_half_precision(dtype):
    torch.manual_seed(1)
    layer = random_structure(GBLRLinear(64, 96, num_components=6, rank=8, tile=8)).to(DEVICE)
    x = torch.randn(50, 64, device=DEVICE)
    with torch.no_grad():
        expected = layer(x)
    fast = CompactGBLRLinear(layer, calibrate=False).to(dtype)
    out = fast.run(x.to(dtype), "kernel")
    assert out.dtype == dtype
    assert relative(out, expected) <= 2e-2


def test_empty_structure_gives_the_bias():
    layer = random_structure(GBLRLinear(48, 40, num_components=6, rank=2)).to(DEVICE)
    with torch.no_grad():
        layer.out_widths.zero_()
    fast = CompactGBLRLinear(layer, calibrate=False)
    x = torch.randn(5, 48, device=DEVICE)
    assert torch.allclose(fast.run(x, "kernel"), layer.bias.detach().expand(5, 40))


def test_kernel_needs_triton_and_a_device(monkeypatch):
    layer = random_structure(GBLRLinear(32, 32, num_components=4))
    fast = CompactGBLRLinear(layer, calibrate=False)
    monkeypatch.setattr(compact_kernel, "available", lambda device: False)
    assert "kernel" not in fast.executions()
    with pytest.raises(ValueError, match="needs Triton and a CUDA device"):
        fast.run(torch.randn(2, 32), "kernel")
