import math

import pytest
import torch

from gblr.mask import (
    boxcar_mask,
    gaudi_mask,
    gaudi_mask_with_decay,
    hard_mask,
    interval_sizes,
    inverse_two_sigma_squared,
    round_to_grid,
    rounded_gaudi_masks,
)


def reference_boxcar(size: int, start: int, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.float64)
    for i in range(size):
        mask[(start + i) % n] = 1.0
    return mask


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33, 100, 768])
def test_dirichlet_mask_is_exact_boxcar_at_integer_intervals(n):
    gen = torch.Generator().manual_seed(n)
    sizes = torch.randint(0, n + 1, (40,), generator=gen)
    sizes[:3] = torch.tensor([0, n, min(1, n)])  # empty, full width, one element
    starts = torch.randint(0, n, (40,), generator=gen)
    widths, offsets = sizes.double() / n, starts.double() / n
    for dtype in (torch.float64, torch.float32):
        mask = gaudi_mask(widths.to(dtype), offsets.to(dtype), n, sigma=None)
        expected = torch.stack([reference_boxcar(int(s), int(l), n) for s, l in zip(sizes, starts)])
        assert (mask.double() - expected).abs().max() <= 1e-6
        assert torch.equal(boxcar_mask(widths, offsets, n), expected)


def test_wrap_around_interval():
    mask = boxcar_mask(torch.tensor([0.5]), torch.tensor([0.75]), 8)
    assert mask.tolist() == [[1, 1, 0, 0, 0, 0, 1, 1]]
    soft = gaudi_mask(torch.tensor([0.5]), torch.tensor([0.75]), 8)
    assert torch.allclose(soft, mask, atol=1e-6)


def test_gaudi_tends_to_dirichlet_for_large_sigma():
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(20, generator=gen, dtype=torch.float64)
    l = torch.rand(20, generator=gen, dtype=torch.float64)
    dirichlet = gaudi_mask(w, l, 64, sigma=None, round_to_grid=False)
    gaps = [(gaudi_mask(w, l, 64, sigma=s, round_to_grid=False) - dirichlet).abs().max().item() for s in (1, 10, 100, 1e4)]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-4 and gaps[0] > 0.1


def test_small_sigma_smooths_the_mask():
    w, l = torch.tensor([0.25]), torch.tensor([0.5])
    sharp = gaudi_mask(w, l, 64, sigma=None)
    smooth = gaudi_mask(w, l, 64, sigma=2.0)
    # Same mass (the DC term is untouched), but spread over more entries.
    assert math.isclose(sharp.sum().item(), smooth.sum().item(), rel_tol=1e-5)
    assert (smooth > 1e-3).sum() > (sharp > 1e-3).sum()


@pytest.mark.parametrize("sigma", [None, 3.0])
@pytest.mark.parametrize("n", [12, 13])
def test_gradcheck_widths_and_starts(sigma, n):
    # Includes width 0 and width 1, and a start that wraps around.
    w = torch.tensor([0.0, 0.3, 1.0, 0.55], dtype=torch.float64, requires_grad=True)
    l = torch.tensor([0.1, 0.95, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, l: gaudi_mask(w, l, n, sigma=sigma, round_to_grid=False), (w, l))


def test_gradient_at_zero_width_is_not_zero():
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    l = torch.tensor([0.3], dtype=torch.float64)
    gaudi_mask(w, l, 32, sigma=2.0).sum().backward()
    assert w.grad.abs().item() > 1.0  # d(mass)/dw = n


def test_straight_through_rounding():
    w = torch.tensor([0.26], dtype=torch.float64, requires_grad=True)
    rounded = round_to_grid(w, 4)
    assert rounded.item() == 0.25
    rounded.sum().backward()
    assert w.grad.item() == 1.0
    # The rounded mask's gradient is the smooth mask's gradient at the rounded point.
    w1 = torch.tensor([0.26], dtype=torch.float64, requires_grad=True)
    w2 = torch.tensor([0.25], dtype=torch.float64, requires_grad=True)
    l = torch.tensor([0.375], dtype=torch.float64)
    weights = torch.arange(16, dtype=torch.float64)
    (gaudi_mask(w1, l, 16, sigma=2.0) * weights).sum().backward()
    (gaudi_mask(w2, l, 16, sigma=2.0, round_to_grid=False) * weights).sum().backward()
    assert torch.allclose(w1.grad, w2.grad)


def test_hard_mask_drops_narrow_widths_and_tiny_values():
    w = torch.tensor([0.5 / 32, 0.25])
    l = torch.tensor([0.0, 0.5])
    assert interval_sizes(w, 32).tolist() == [0, 8]
    mask = hard_mask(w, l, 32, sigma=50.0)
    assert mask[0].abs().sum() == 0
    assert ((mask[1] == 0) | (mask[1].abs() >= 1e-3)).all()
    assert torch.equal(hard_mask(w, l, 32, sigma=None), boxcar_mask(w, l, 32))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be"),
        ({"n": 2.5}, "n must be"),
        ({"sigma": float("nan")}, "sigma"),
        ({"sigma": float("inf")}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"starts": torch.zeros(3)}, "same shape"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"widths": torch.zeros(2), "starts": torch.zeros(2), "n": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        gaudi_mask(**args)


def test_tiles_round_intervals_to_whole_tiles():
    w = torch.tensor([0.30, 0.05, 1.0, 0.0])
    l = torch.tensor([0.26, 0.5, 0.0, 0.3])
    assert interval_sizes(w, 64, tile=8).tolist() == [16, 0, 64, 0]  # 19.2 -> 2 tiles; 3.2 < one tile
    assert interval_sizes(w, 64).tolist() == [19, 3, 64, 0]
    mask = boxcar_mask(w, l, 64, tile=8)
    assert mask[0].nonzero().flatten().tolist() == list(range(16, 32))  # start 16.6 -> tile 2
    soft = gaudi_mask(w[:1], l[:1], 64, tile=8)
    assert torch.allclose(soft, mask[:1], atol=1e-6)
    with pytest.raises(ValueError, match="tile"):
        gaudi_mask(w, l, 64, tile=0)


@pytest.mark.parametrize("n, tile", [(1, 1), (2, 1), (7, 1), (12, 1), (12, 4), (13, 1), (64, 8), (100, 1)])
@pytest.mark.parametrize("sigma", [None, 0.7, 3.0, 100.0])
def test_fast_rounded_masks_equal_the_spectral_formula(n, tile, sigma):
    # The rounded masks come from prefix sums of a blur kernel with a closed-form backward; values and
    # gradients must be those of the spectral formula at the rounded point, for several sides at once.
    gen = torch.Generator().manual_seed(n * 10 + tile)
    widths = torch.rand(9, generator=gen, dtype=torch.float64)
    widths[:3] = torch.tensor([0.0, 1.0, 0.999])
    starts = torch.rand(9, generator=gen, dtype=torch.float64) * 1.5  # starts past 1 wrap around
    decay = inverse_two_sigma_squared(sigma)
    w_ref, l_ref = widths.clone().requires_grad_(), starts.clone().requires_grad_()
    w_fast, l_fast = widths.clone().requires_grad_(), starts.clone().requires_grad_()
    reference = gaudi_mask_with_decay(w_ref, l_ref, n, decay, True, tile)
    decays = torch.tensor([decay, decay], dtype=torch.float64)
    fast = torch.cat(rounded_gaudi_masks([w_fast[:4], w_fast[4:]], [l_fast[:4], l_fast[4:]], decays, n, tile))
    assert (fast - reference).abs().max() <= 1e-9
    upstream = torch.randn(9, n, generator=gen, dtype=torch.float64)
    (reference * upstream).sum().backward()
    (fast * upstream).sum().backward()
    for fast_grad, ref_grad in ((w_fast.grad, w_ref.grad), (l_fast.grad, l_ref.grad)):
        assert (fast_grad - ref_grad).abs().max() <= 1e-9 * max(1.0, ref_grad.abs().max().item())


def test_fast_masks_cut_into_pieces_and_mixed_sigmas():
    gen = torch.Generator().manual_seed(3)
    widths = [torch.rand(k, generator=gen) for k in (3, 5, 2)]
    starts = [torch.rand(k, generator=gen) for k in (3, 5, 2)]
    sigmas = [None, 2.0, 50.0]
    decays = torch.tensor([inverse_two_sigma_squared(s) for s in sigmas])
    sides = rounded_gaudi_masks(widths, starts, decays, 16)
    pieces = rounded_gaudi_masks(widths, starts, decays, 16, pieces=[8, 2])
    assert [tuple(m.shape) for m in pieces] == [(8, 16), (2, 16)]
    assert torch.equal(torch.cat(sides), torch.cat(pieces))
    for w, l, s, mask in zip(widths, starts, sigmas, sides):
        assert mask.dtype == torch.float32
        assert torch.allclose(mask, gaudi_mask_with_decay(w, l, 16, inverse_two_sigma_squared(s), True), atol=1e-6)


def test_fast_masks_of_non_finite_intervals_are_empty_not_an_index_error():
    # a diverged run's parameters: the trainer reports the loss; the masks must not fail before it does
    nan, inf = float("nan"), float("inf")
    widths, starts = torch.tensor([nan, inf, 0.5, 0.5]), torch.tensor([0.25, 0.25, nan, -inf])
    masks = rounded_gaudi_masks([widths], [starts], torch.tensor([inverse_two_sigma_squared(None)]), 16)[0]
    assert torch.isfinite(masks).all()
    assert torch.equal(masks[0], torch.zeros(16))  # NaN width: empty
    assert torch.equal(masks[1], torch.ones(16))  # infinite width: all of it
    reference = reference_boxcar(8, 0, 16).float()  # non-finite starts begin at 0
    assert torch.allclose(masks[2], reference, atol=1e-6) and torch.allclose(masks[3], reference, atol=1e-6)
