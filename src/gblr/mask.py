"""Differentiable interval masks: the Dirichlet mask and the Gaussian-Dirichlet ("Gaudi") mask.

An interval on the cycle Z_n is described by a normalised width ``w`` and start ``l`` in [0, 1]
(fractions of ``n``). Its boxcar indicator has a closed-form DFT that is smooth in ``w`` and ``l``, so
the mask obtained by an inverse real FFT of that spectrum is differentiable with respect to both. At
integer intervals (``n*w`` and ``n*l`` integers) the Dirichlet mask equals the boxcar exactly; the
Gaudi mask additionally multiplies the spectrum by ``exp(-k^2 / (2 sigma^2))``, a periodic Gaussian
blur that gives informative gradients far from the interval's edges.

All functions are pure and work on any batch shape: ``widths`` and ``starts`` of shape ``(...,)``
give masks of shape ``(..., n)``.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "boxcar_mask",
    "gaudi_mask",
    "gaudi_mask_with_decay",
    "rounded_gaudi_masks",
    "hard_mask",
    "interval_sizes",
    "interval_offsets",
    "round_to_grid",
    "shortest_cyclic_windows",
    "inverse_two_sigma_squared",
    "MASK_EPS",
]

#: Hard (eval) masks zero every entry whose magnitude is below this value.
MASK_EPS = 1e-3


def _check_length(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return n


def _check_intervals(widths: torch.Tensor, starts: torch.Tensor) -> None:
    if not isinstance(widths, torch.Tensor) or not isinstance(starts, torch.Tensor):
        raise ValueError(
            f"widths and starts must be tensors, got {type(widths).__name__} and {type(starts).__name__}"
        )
    if widths.shape != starts.shape:
        raise ValueError(
            f"widths and starts must have the same shape, got {tuple(widths.shape)} and {tuple(starts.shape)}"
        )


SIGMA_MIN, SIGMA_MAX = 1e-6, 1e6  # beyond SIGMA_MAX the Gaudi mask is the Dirichlet mask to float precision


def inverse_two_sigma_squared(sigma) -> float:
    """Map sigma (None = Dirichlet, no Gaussian) to the spectral decay ``1 / (2 sigma^2)``."""
    if sigma is None:
        return 0.0
    if isinstance(sigma, torch.Tensor):
        sigma = float(sigma)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not SIGMA_MIN <= sigma <= SIGMA_MAX:
        raise ValueError(f"sigma must be None or a number in [{SIGMA_MIN:g}, {SIGMA_MAX:g}], got {sigma!r}")
    return 1.0 / (2.0 * float(sigma) ** 2)


def round_to_grid(x: torch.Tensor, n: int, tile: int = 1) -> torch.Tensor:
    """Round ``x`` to the ``tile/n`` grid (whole tiles of rows/columns) in the forward pass; pass the
    gradient unchanged (straight-through)."""
    return x + (torch.round(x * (n / tile)) * (tile / n) - x).detach()


def _output_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gaudi_mask_with_decay(widths, starts, n: int, decay, rounded: bool, tile: int = 1) -> torch.Tensor:
    """:func:`gaudi_mask` without argument checks, with ``decay = 1/(2 sigma^2)`` (a float or a 0-d
    tensor, 0 for Dirichlet). The layers call this in their hot path."""
    # The spectrum is evaluated in float64: in float32 the phase 2*pi*k*l loses ~n ulps, which breaks
    # the exact boxcar at integer intervals for n in the hundreds. Masks are K x n, small next to
    # the matmuls they feed.
    dtype = torch.float64
    w = widths.to(dtype).unsqueeze(-1)
    l = starts.to(dtype).unsqueeze(-1)
    if rounded:
        w = round_to_grid(w, n, tile)
        l = round_to_grid(l, n, tile)
    k = torch.arange(n // 2 + 1, device=widths.device, dtype=dtype)
    k_safe = k.clamp(min=1.0)
    # n * w * sinc(k w) written as n * sin(pi k w) / (pi k): smooth at w = 0 and at k = 0.
    scaled_sinc = torch.where(k == 0, n * w, n * torch.sin(math.pi * k * w) / (math.pi * k_safe))
    amplitude = scaled_sinc / torch.sinc(k / n)
    if isinstance(decay, torch.Tensor):
        amplitude = amplitude * torch.exp(-(k * k) * decay.to(dtype))
    elif decay != 0.0:
        amplitude = amplitude * torch.exp(-(k * k) * decay)
    phase = -(2.0 * math.pi * k * l + math.pi * k * (w - 1.0 / n))
    spectrum = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
    return torch.fft.irfft(spectrum, n=n, dim=-1).to(_output_dtype(widths))


# --- the rounded masks, fast -----------------------------------------------------------------------
# With straight-through rounding the forward mask is evaluated only at whole rows (tiles): integer
# size W and start L. There the spectrum is the boxcar's times the Gaussian, so the mask is a boxcar
# blurred by one fixed kernel g = irfft(G), i.e. a difference of two entries of g's cyclic prefix sum.
# The derivatives of the spectral formula at those points are shifts of two more fixed kernels:
#   d mask[x] / d l = e[x - L] - e[x - L - W],  e = irfft(-2 pi i k G_k / (1 - exp(-2 pi i k / n)))
#   d mask[x] / d w = n f[x - L - W],           f = irfft(G_k exp(i pi k / n) / sinc(k / n))
# (k = 0..n//2; irfft drops the imaginary Nyquist term exactly as it does for the spectral mask). So a
# whole batch of masks costs a few gathers from three small (sides x 3n) tables instead of one complex FFT
# per row, in any precision, with a closed-form backward.


@functools.lru_cache(maxsize=64)
def _bin_factors(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared frequencies k^2 (bins,) and the per-bin factors (3, bins) of g, e and f before the Gaussian."""
    k = torch.arange(n // 2 + 1, device=device, dtype=torch.float64)
    shift = torch.polar(torch.ones_like(k), -2.0 * math.pi * k / n)  # exp(-2 pi i k / n)
    start_kernel = torch.where(k > 0, -2j * math.pi * k / (1.0 - shift + (k == 0)), 0.0)
    width_kernel = torch.polar(1.0 / torch.sinc(k / n), math.pi * k / n)
    return k * k, torch.stack([torch.ones_like(start_kernel), start_kernel, width_kernel])


@functools.lru_cache(maxsize=256)
def _layout(sizes: tuple[int, ...], n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Index constants of a batch of sides (made once per layout: no host-to-device copy per step):
    positions ``(n,)``, and per row (as ``(rows, 1)`` columns) where its side's tables start, shifted
    by two periods so that ``position - start`` (in ``(-n, n)``) indexes them without a remainder: the
    prefix sums (``3n+1`` entries per side) and the two derivative kernels (``2 x 3n``)."""
    side = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).unsqueeze(1)
    prefix_row, kernel_row = side * (3 * n + 1) + 2 * n + 1, side * (6 * n) + 2 * n
    return tuple(t.to(device) for t in (torch.arange(n), prefix_row, kernel_row))


def _cached(function, *args):
    # Under torch.compile the constants are traced into the graph instead (dynamo skips caches).
    return function.__wrapped__(*args) if torch.compiler.is_compiling() else function(*args)


class _RoundedMasks(torch.autograd.Function):
    """Masks of one length ``n`` for several sides (each a list entry), rounded to the ``tile/n`` grid
    in the forward pass, gradients of the spectral formula at the rounded point (straight-through)."""

    @staticmethod
    def forward(ctx, n: int, tile: int, decays: torch.Tensor, sizes: list[int], pieces: list[int], *intervals):
        sides = len(sizes)
        widths, starts = torch.cat(intervals[:sides]), torch.cat(intervals[sides:])
        squared_k, factors = _cached(_bin_factors, n, widths.device)
        gauss = torch.exp(squared_k * -decays.to(torch.float64).unsqueeze(-1))  # (sides, bins)
        # The kernels g, e, f over three periods (sides, 3, 3n), so that shifts in (-2n, n) need no remainder.
        kernels = torch.fft.irfft(gauss.unsqueeze(1) * factors, n=n, dim=-1).repeat(1, 1, 3)
        # Cyclic prefix sums of the blur kernel: prefix[j] = sum of g[t mod n] for t < j, j = 0..3n.
        dtype = _output_dtype(widths)
        prefix = torch.nn.functional.pad(kernels[:, 0].cumsum(1), (1, 0)).to(dtype)
        position, prefix_row, kernel_row = _cached(_layout, tuple(sizes), n, widths.device)
        grid = n / tile
        # A diverged run's NaN or infinite intervals become empty ones at 0 rather than indexes outside the
        # tables: the trainer then stops on the non-finite loss with its own error (it checks at log steps).
        size = torch.nan_to_num(torch.round(widths * grid) * tile, nan=0.0).clamp(0, n).to(torch.long).unsqueeze(1)
        start = torch.remainder(torch.nan_to_num(torch.round(starts * grid) * tile, nan=0.0, posinf=0.0, neginf=0.0), n)
        start = start.to(torch.long).unsqueeze(1)
        # mask[x] sums g over [x-L-W+1, x-L]; offsets are combined per row before the (rows, n) adds.
        row_end = prefix_row - start
        masks = torch.take(prefix, position + row_end) - torch.take(prefix, position + (row_end - size))
        ctx.n, ctx.sizes = n, sizes
        ctx.save_for_backward(kernels[:, 1:].to(dtype), position, kernel_row, start, size)
        return masks.split(pieces)

    @staticmethod
    def backward(ctx, *grads):
        derivative_kernels, position, kernel_row, start, size = ctx.saved_tensors
        n = ctx.n
        grad = torch.cat(grads)
        row_start = kernel_row - start  # e[x - L] at position + row_start; f follows e at +3n
        row_end = row_start - size  # e[x - L - W]
        d_start = torch.take(derivative_kernels, position + row_start) - torch.take(derivative_kernels, position + row_end)
        d_width = torch.take(derivative_kernels, position + (row_end + 3 * n)) * n
        grad_widths = (grad * d_width).sum(1)
        grad_starts = (grad * d_start).sum(1)
        return (None,) * 5 + (*grad_widths.split(ctx.sizes), *grad_starts.split(ctx.sizes))


def rounded_gaudi_masks(
    widths, starts, decays: torch.Tensor, n: int, tile: int = 1, pieces: list[int] | None = None
) -> list[torch.Tensor]:
    """Rounded Gaudi masks of several sides of length ``n`` in one call: ``widths[i]`` and ``starts[i]``
    of shape ``(K_i,)`` and ``decays[i]`` (``1/(2 sigma_i^2)``, 0 for Dirichlet) give a ``(K_i, n)``
    mask. ``pieces`` (row counts summing to ``sum K_i``) returns the stacked rows cut differently, e.g.
    one piece for several sides that are used together. Equals :func:`gaudi_mask_with_decay` with
    ``rounded=True`` for widths in [0, 1], with the same gradients; used by the layers in their
    training forward."""
    sizes = [len(w) for w in widths]
    return list(_RoundedMasks.apply(n, tile, decays, sizes, pieces or sizes, *widths, *starts))


def gaudi_mask(
    widths: torch.Tensor,
    starts: torch.Tensor,
    n: int,
    sigma: float | None = None,
    round_to_grid: bool = True,
    tile: int = 1,
) -> torch.Tensor:
    """Differentiable mask of the cyclic intervals ``[n*starts, n*(starts+widths))`` on ``Z_n``.

    ``sigma=None`` gives the Dirichlet mask (exact boxcar at integer intervals); a finite ``sigma``
    the Gaudi mask. With ``round_to_grid`` the widths and starts are rounded to the ``tile/n`` grid in
    the forward pass with a straight-through gradient. Returns float64 for float64 inputs and
    float32 otherwise.
    """
    n = _check_length(n)
    _check_intervals(widths, starts)
    decay, tile = inverse_two_sigma_squared(sigma), _check_tile(tile)
    if round_to_grid and widths.dim() == 1 and len(widths):
        decays = torch.tensor([decay], device=widths.device)
        return rounded_gaudi_masks([widths], [starts], decays, n, tile)[0]
    return gaudi_mask_with_decay(widths, starts, n, decay, bool(round_to_grid), tile)


def _check_tile(tile) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be an integer >= 1, got {tile!r}")
    return tile


def interval_sizes(widths: torch.Tensor, n, tile=1) -> torch.Tensor:
    """Integer interval sizes of the hard (eval) structure: ``n*w`` rounded to whole tiles, 0 below
    one tile, at most ``n``. ``n`` and ``tile`` may be tensors broadcasting with ``widths``."""
    tiles = widths.detach().to(torch.float64) * (n / tile)
    sizes = torch.where(tiles < 1.0, torch.zeros_like(tiles), torch.round(tiles) * tile)
    return torch.minimum(sizes, torch.as_tensor(n, dtype=torch.float64, device=sizes.device)).to(torch.long)


def interval_offsets(starts: torch.Tensor, n: int, tile: int = 1) -> torch.Tensor:
    """Integer interval starts of the hard structure: ``n*l`` rounded to whole tiles, mod ``n``."""
    return torch.remainder(torch.round(starts.detach().to(torch.float64) * (n / tile)) * tile, n).to(torch.long)


def boxcar_mask(widths: torch.Tensor, starts: torch.Tensor, n: int, tile: int = 1) -> torch.Tensor:
    """Exact 0/1 indicator of the hard intervals (sizes from :func:`interval_sizes`), with wrap-around."""
    n = _check_length(n)
    _check_intervals(widths, starts)
    sizes = interval_sizes(widths, n, tile).unsqueeze(-1)
    offsets = interval_offsets(starts, n, tile).unsqueeze(-1)
    position = torch.remainder(torch.arange(n, device=widths.device) - offsets, n)
    return (position < sizes).to(_output_dtype(widths))


def hard_mask(
    widths: torch.Tensor, starts: torch.Tensor, n: int, sigma: float | None = None, tile: int = 1
) -> torch.Tensor:
    """The eval-mode mask: widths below one tile (``tile/n``) dropped, then the exact boxcar
    (``sigma=None``) or the rounded Gaudi mask with entries below :data:`MASK_EPS` zeroed."""
    decay = inverse_two_sigma_squared(sigma)
    if decay == 0.0:
        return boxcar_mask(widths, starts, n, tile)
    n = _check_length(n)
    _check_intervals(widths, starts)
    kept = torch.where(widths.detach() * (n / tile) < 1.0, torch.zeros_like(widths), widths.detach())
    mask = gaudi_mask_with_decay(kept, starts.detach(), n, decay, rounded=True, tile=tile)
    return torch.where(mask.abs() < MASK_EPS, torch.zeros_like(mask), mask)


def shortest_cyclic_windows(weights: torch.Tensor, keep: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of non-negative ``weights`` (K, n): the shortest cyclic window holding at least
    ``keep`` of the row's total, as integer (starts, sizes). ``keep=1`` gives the exact support of a
    row's nonzeros (as the shortest interval covering them); a row of zeros gets size 0."""
    k, n = weights.shape
    weights = weights.detach().double()
    total = weights.sum(dim=1)
    needed = keep * total * (1.0 - 1e-12)  # float sums of the same entries may differ in the last ulp
    # Sums over every window [s, s + w) from the cumulative sum of the doubled row.
    cumulative = torch.cat([weights.new_zeros(k, 1), torch.cat([weights, weights], dim=1).cumsum(1)], dim=1)
    positions = torch.arange(n, device=weights.device)

    def best(width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums = cumulative.gather(1, positions[None] + width[:, None]) - cumulative[:, :n]
        return sums.max(dim=1)

    lo = torch.zeros(k, dtype=torch.long, device=weights.device)
    hi = torch.full((k,), n, dtype=torch.long, device=weights.device)
    while bool((lo < hi).any()):  # binary search on the width: window sums grow with it
        mid = (lo + hi) // 2
        enough = best(mid)[0] >= needed
        hi = torch.where(enough & (lo < hi), mid, hi)
        lo = torch.where(~enough & (lo < hi), mid + 1, lo)
    starts = best(hi)[1]
    sizes = torch.where(total > 0, hi, torch.zeros_like(hi))
    return starts, sizes
