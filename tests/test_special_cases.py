import pytest
import torch

from gblr.structured.gblr_special import (
    block_mask,
    gblr_block_diagonal,
    gblr_block_low_rank,
    gblr_block_sparse,
    gblr_lowrank,
)


def dense_of(layer):
    layer.eval()
    return layer.to_dense()


def test_lowrank():
    u, v = torch.randn(48, 6, dtype=torch.float64), torch.randn(80, 6, dtype=torch.float64)
    for rank in (1, 2, 3, 6):
        layer = gblr_lowrank(u, v, rank=rank)
        assert torch.allclose(dense_of(layer), u @ v.T, atol=1e-12)
        assert layer.macs_per_token() == 6 * (48 + 80)


def test_block_diagonal():
    blocks = [torch.randn(8, 12, dtype=torch.float64) for _ in range(4)]
    layer = gblr_block_diagonal(blocks)
    assert torch.allclose(dense_of(layer), torch.block_diag(*blocks), atol=1e-12)
    assert layer.macs_per_token() == 4 * 8 * 12


@pytest.mark.parametrize("seed", range(5))
def test_block_sparse_any_pattern(seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(64, 96, generator=gen, dtype=torch.float64)
    pattern = torch.rand(4, 6, generator=gen) < 0.4
    pattern[seed % 4, seed % 6] = True
    layer = gblr_block_sparse(weight, (16, 16), pattern)
    assert torch.allclose(dense_of(layer), weight * block_mask(pattern, (16, 16)), atol=1e-12)
    assert layer.macs_per_token() == int(pattern.sum()) * 16 * 16


def test_block_low_rank():
    weight = torch.randn(32, 48, dtype=torch.float64)
    layer = gblr_block_low_rank(weight, (16, 16), block_rank=3)
    reference = torch.zeros_like(weight)
    for i in range(2):
        for j in range(3):
            block = weight[16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)]
            p, s, qh = torch.linalg.svd(block)
            reference[16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)] = (p[:, :3] * s[:3]) @ qh[:3]
    assert torch.allclose(dense_of(layer), reference, atol=1e-12)
    assert layer.macs_per_token() == 6 * 3 * (16 + 16)


def test_bad_block_shapes():
    with pytest.raises(ValueError, match="block_shape"):
        gblr_block_sparse(torch.randn(30, 32), (16, 16))
    with pytest.raises(ValueError, match="pattern"):
        gblr_block_sparse(torch.randn(32, 32), (16, 16), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_rank"):
        gblr_block_low_rank(torch.randn(32, 32), (16, 16), 17)
