"""The Generalized Block Low-Rank (GBLR) linear layer.

``W = sum_k (mask_out_k * U_k) (mask_in_k * V_k)^T`` with ``K`` components of rank ``r``. Component
``k`` is a rank-``r`` block whose rows are the cyclic output interval (``out_widths[k]``,
``out_starts[k]``) and whose columns are the input interval (``in_widths[k]``, ``in_starts[k]``), all
normalised to [0, 1]. The masks are Gaudi masks (:mod:`gblr.mask`), so widths and starts are learned by
gradient descent together with the factors.

Layout: ``out_factors`` is ``(K, r, out_features)`` and ``in_factors`` is ``(K, r, in_features)``, so
the masked factors flatten without a copy to the ``(K*r, features)`` matrices of the two skinny matmuls.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..linalg import thin_svd
from ..mask import (
    gaudi_mask_with_decay,
    hard_mask,
    interval_offsets,
    interval_sizes,
    inverse_two_sigma_squared,
    rounded_gaudi_masks,
)
from .base import StructuredLinear, check_features, check_weight, unreachable_budget
from .frozen_blocks import FrozenBlocks

MAX_RANK_PER_FEATURE = 8  # components x rank beyond 8 x the larger dimension add nothing a layer can use

__all__ = ["GBLRLinear", "WIDTH_INITS", "splr_widths", "lowrank_widths", "masked_product"]


#: Names accepted by ``width_init``: "splr" (FLOPs-neutral), "full", or "lrX" with X in (0, 1].
WIDTH_INITS = ("splr", "full", "lrX")


def splr_widths(num_components: int, rank: int, out_features: int, in_features: int) -> torch.Tensor:
    """FLOPs-neutral widths: some components full width, the rest equally narrow, total cost ~ dense."""
    m, n, k = out_features, in_features, num_components
    half_rho = m * n / (k * rank * (m + n)) / 2.0
    if half_rho >= 1.0:  # too few components to spend the dense cost: give every one full width
        return torch.ones(k, dtype=torch.float64)
    num_full = math.floor(k * half_rho)
    widths = torch.full((k,), half_rho / (1.0 - half_rho), dtype=torch.float64)
    widths[:num_full] = 1.0
    return widths


def lowrank_widths(num_components: int, fraction: float) -> torch.Tensor:
    """The first ``floor(fraction*K)`` components full width, the others width 0 (they can grow back)."""
    widths = torch.zeros(num_components, dtype=torch.float64)
    widths[: math.floor(fraction * num_components)] = 1.0
    return widths


def _initial_widths(width_init: str, num_components: int, rank: int, m: int, n: int) -> torch.Tensor:
    if width_init == "splr":
        return splr_widths(num_components, rank, m, n)
    if width_init == "full":
        return torch.ones(num_components, dtype=torch.float64)
    match = re.fullmatch(r"lr(\d*\.?\d+)", width_init) if isinstance(width_init, str) else None
    if match and 0.0 < float(match.group(1)) <= 1.0:
        return lowrank_widths(num_components, float(match.group(1)))
    raise ValueError(
        f"width_init must be 'splr', 'full' or 'lrX' with 0 < X <= 1 (e.g. 'lr0.5'), got {width_init!r}"
    )


def _svd_factors(weight: torch.Tensor, total_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``weight`` into ``total_rank`` rank-1 terms ``P sqrt(S)``, ``Q sqrt(S)``, largest first.

    When ``total_rank`` exceeds the matrix rank, the remaining terms are zero.
    """
    p, s, qh = thin_svd(weight.to(torch.float64))
    root = s.sqrt()
    u = (p * root).T  # (rank, m)
    v = qh * root[:, None]  # (rank, n)
    if total_rank <= u.shape[0]:
        return u[:total_rank], v[:total_rank]
    pad = total_rank - u.shape[0]
    return torch.cat([u, u.new_zeros(pad, u.shape[1])]), torch.cat([v, v.new_zeros(pad, v.shape[1])])


class GBLRLinear(StructuredLinear):
    """Drop-in for :class:`torch.nn.Linear` whose weight is a learnable GBLR matrix.

    Args:
        in_features, out_features, bias, device, dtype: as in :class:`torch.nn.Linear`.
        num_components: number of components ``K``. Default: from ``rank_ratio``.
        rank: rank ``r`` of each component (1 in the paper; larger ranks map onto efficient kernels).
        rank_ratio: ``K*r`` as a fraction of ``min(in_features, out_features)`` (default 1.0, i.e.
            enough components to represent any dense matrix), used when ``num_components`` is None.
        width_init: "splr" (FLOPs-neutral), "full", or "lrX" (first X*K components full width).
        sigma: Gaussian width of the Gaudi mask; None for the Dirichlet mask (exact boxcar).
        round_to_grid: straight-through rounding of widths and starts to whole rows/columns (tiles).
        tile: hardware-aware structure: intervals start and end on multiples of ``tile`` rows/columns,
            so the learned blocks map onto efficient block products (1 = free structure).
        random_factors: start the factors from the SVD of a random ``nn.Linear``-style matrix (False:
            zeros, for callers that set them; the SVD takes about a second for thousands of components).
    """

    family = "gblr"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        num_components: int | None = None,
        rank: int = 1,
        rank_ratio: float = 1.0,
        width_init: str = "splr",
        sigma: float | None = None,
        round_to_grid: bool = True,
        tile: int = 1,
        random_factors: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features)
        self.rank = check_features("rank", rank)
        if num_components is None:
            if not (isinstance(rank_ratio, (int, float)) and 0 < rank_ratio and math.isfinite(rank_ratio)):
                raise ValueError(f"rank_ratio must be a positive finite number, got {rank_ratio!r}")
            num_components = max(1, round(rank_ratio * min(in_features, out_features) / rank))
        self.num_components = check_features("num_components", num_components)
        most = MAX_RANK_PER_FEATURE * max(in_features, out_features)
        if self.num_components * self.rank > most:  # refused before minutes of allocation
            raise ValueError(f"num_components x rank must be at most {MAX_RANK_PER_FEATURE} x max(in_features, out_features) "
                             f"= {most} for a {in_features}->{out_features} layer, got {self.num_components} x {self.rank}")
        self.width_init = width_init
        self.round_to_grid = bool(round_to_grid)
        self.tile = check_features("tile", tile)
        # Validate before allocating anything.
        init_widths = _initial_widths(width_init, self.num_components, self.rank, out_features, in_features)

        factory = {"device": device, "dtype": dtype}
        k, r = self.num_components, self.rank
        self.out_factors = nn.Parameter(torch.empty(k, r, out_features, **factory))
        self.in_factors = nn.Parameter(torch.empty(k, r, in_features, **factory))
        structure = {"device": device, "dtype": _structure_dtype(dtype or torch.get_default_dtype())}
        self.out_widths = nn.Parameter(torch.empty(k, **structure))
        self.out_starts = nn.Parameter(torch.empty(k, **structure))
        self.in_widths = nn.Parameter(torch.empty(k, **structure))
        self.in_starts = nn.Parameter(torch.empty(k, **structure))
        self._init_bias(bias, factory)
        # 1/(2 sigma^2) as a buffer: changing sigma does not trigger recompilation under torch.compile.
        self.register_buffer("sigma_decay", torch.tensor(inverse_two_sigma_squared(sigma), device=device))
        self._eval_cache: tuple[tuple, torch.Tensor] | None = None
        self._frozen_cache: tuple[tuple, FrozenBlocks | None] | None = None
        self._packed: _PackedTraining | None = None  # see pack_for_training_
        # Set by gblr.shared_masks for the duration of one forward pass of the model: it computes the
        # training masks (and effective weights) of all layers together.
        self.shared = None
        self._reset_parameters(init_widths, random_factors)

    # --- initialisation --------------------------------------------------------------------------
    def _reset_parameters(self, init_widths: torch.Tensor, random_factors: bool) -> None:
        """Factors from the SVD of an ``nn.Linear``-style random matrix (or zeros); widths per ``width_init``."""
        if random_factors:
            self._set_random_factors()
        else:
            with torch.no_grad():
                self.out_factors.zero_()
                self.in_factors.zero_()
        self._set_widths(init_widths, init_widths)
        with torch.no_grad():
            partial = init_widths < 1.0
            for starts in (self.out_starts, self.in_starts):
                starts.zero_()
                starts[partial.to(starts.device)] = torch.rand(int(partial.sum()), device=starts.device).to(
                    starts.dtype
                )

    def _set_random_factors(self) -> None:
        m, n, total = self.out_features, self.in_features, self.num_components * self.rank
        device = self.out_factors.device
        bound = 1.0 / math.sqrt(n)
        # When K*r > min(m, n) the components come from several random matrices, scaled so that the
        # sum of all of them has the variance of one nn.Linear weight.
        num_matrices = math.ceil(total / min(m, n))
        us, vs = [], []
        for _ in range(num_matrices):
            dense = torch.empty(m, n, dtype=torch.float64, device=device).uniform_(-bound, bound)
            u, v = _svd_factors(dense / math.sqrt(num_matrices), min(m, n))
            us.append(u)
            vs.append(v)
        self._set_factors(torch.cat(us)[:total], torch.cat(vs)[:total])

    @classmethod
    def to_be_overwritten(cls, in_features: int, out_features: int, **kwargs) -> "GBLRLinear":
        return cls(in_features, out_features, random_factors=False, **kwargs)

    def _set_factors(self, u: torch.Tensor, v: torch.Tensor) -> None:
        with torch.no_grad():
            self.out_factors.copy_(u.reshape(self.out_factors.shape))
            self.in_factors.copy_(v.reshape(self.in_factors.shape))

    def _set_widths(self, out_widths: torch.Tensor, in_widths: torch.Tensor) -> None:
        with torch.no_grad():
            self.out_widths.copy_(out_widths)
            self.in_widths.copy_(in_widths)

    @classmethod
    def size_for_budget(cls, in_features, out_features, budget, rank: int = 1, **options) -> dict:
        """``min(in, out) / rank`` components, of which as many full-width ones as the budget allows
        (a low-rank start that training or fitting reshapes); the others start empty."""
        m, n = out_features, in_features
        num_components = max(1, min(m, n) // rank)
        full = min(math.floor(budget * m * n / (rank * (m + n))), num_components)
        if full < 1:
            raise unreachable_budget(cls.family, n, m, budget, rank * (m + n) / (m * n))
        return {"num_components": num_components, "rank": rank, "width_init": f"lr{(full + 0.5) / num_components:.12f}"}

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        budget: float | None = None,
        bias: torch.Tensor | None = None,
        *,
        num_components: int | None = None,
        rank: int = 1,
        width_init: str = "full",
        **kwargs,
    ) -> "GBLRLinear":
        """Components from the SVD of ``weight`` (largest singular values first), widths per
        ``width_init``; with ``width_init="full"`` and ``K*r >= rank(weight)`` the layer equals ``weight``.
        ``kwargs`` go to the constructor. Fitting to a budget is :func:`gblr.fit.fit_gblr` (a ``budget``
        here is refused with that pointer).
        """
        check_weight(weight)
        m, n = weight.shape
        if bias is not None and tuple(bias.shape) != (m,):
            raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
        if budget is not None:  # fitting to a budget builds on this module: it lives above it
            raise ValueError("GBLRLinear.from_dense takes no budget; fit one with gblr.fit.fit_gblr or "
                             "gblr.fit.structured_from_dense('gblr', weight, budget)")
        layer = cls.to_be_overwritten(
            n, m, bias=bias is not None, num_components=num_components, rank=rank,
            width_init=width_init, device=weight.device, dtype=weight.dtype, **kwargs,
        )
        u, v = _svd_factors(weight.detach(), layer.num_components * layer.rank)
        layer._set_factors(u, v)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_intervals(
        cls,
        out_intervals: Sequence[tuple[int, int]],
        in_intervals: Sequence[tuple[int, int]],
        out_factors: torch.Tensor,
        in_factors: torch.Tensor,
        bias: torch.Tensor | None = None,
        **kwargs,
    ) -> "GBLRLinear":
        """A layer with explicit integer intervals ``(start, size)`` per component.

        ``out_factors`` is ``(K, r, out_features)`` and ``in_factors`` ``(K, r, in_features)``; only their
        entries inside each component's intervals matter.
        """
        if out_factors.dim() != 3 or in_factors.dim() != 3 or out_factors.shape[:2] != in_factors.shape[:2]:
            raise ValueError(
                "out_factors and in_factors must be (K, r, out_features) and (K, r, in_features), got "
                f"{tuple(out_factors.shape)} and {tuple(in_factors.shape)}"
            )
        k, r, m = out_factors.shape
        n = in_factors.shape[2]
        out_iv = _interval_tensor("out_intervals", out_intervals, k, m)
        in_iv = _interval_tensor("in_intervals", in_intervals, k, n)
        layer = cls.to_be_overwritten(
            n, m, bias=bias is not None, num_components=k, rank=r, width_init="full",
            device=out_factors.device, dtype=out_factors.dtype, **kwargs,
        )
        layer._set_factors(out_factors.detach(), in_factors.detach())
        with torch.no_grad():
            layer.out_starts.copy_(out_iv[:, 0] / m)
            layer.out_widths.copy_(out_iv[:, 1] / m)
            layer.in_starts.copy_(in_iv[:, 0] / n)
            layer.in_widths.copy_(in_iv[:, 1] / n)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    # --- structure -------------------------------------------------------------------------------
    @property
    def sigma(self) -> float | None:
        decay = float(self.sigma_decay)
        return None if decay == 0.0 else 1.0 / math.sqrt(2.0 * decay)

    @sigma.setter
    def sigma(self, value: float | None) -> None:
        self.sigma_decay.fill_(inverse_two_sigma_squared(value))

    def structure_parameters(self) -> list[nn.Parameter]:
        """Widths and starts: trained with their own optimizer group and the proximal step."""
        return [self.out_widths, self.out_starts, self.in_widths, self.in_starts]

    def factor_parameters(self) -> list[nn.Parameter]:
        return [self.out_factors, self.in_factors]

    def interval_sizes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer (output, input) interval sizes of each component's hard structure."""
        return (
            interval_sizes(self.out_widths, self.out_features, self.tile),
            interval_sizes(self.in_widths, self.in_features, self.tile),
        )

    def active_components(self) -> torch.Tensor:
        """Boolean mask of the components whose two intervals are both non-empty."""
        h, w = self.interval_sizes()
        return (h > 0) & (w > 0)

    def constructor_options(self) -> dict:
        return {
            "num_components": self.num_components, "rank": self.rank, "tile": self.tile,
            "round_to_grid": self.round_to_grid, "width_init": "full",
        }

    def macs_per_token(self) -> int:
        h, w = self.interval_sizes()
        per_component = torch.minimum(self.rank * (h + w), h * w)
        return int((per_component * ((h > 0) & (w > 0))).sum())

    def effective_parameters(self) -> int:
        h, w = self.interval_sizes()
        active = (h > 0) & (w > 0)
        block = torch.minimum(self.rank * (h + w), h * w)
        return int((block * active).sum()) + self._bias_size()

    # --- masks and weights -----------------------------------------------------------------------
    def _soft_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared is not None:
            return self.shared.masks(self)
        m, n, tile = self.out_features, self.in_features, self.tile
        if not self.round_to_grid:  # masks at fractional intervals: the spectral formula
            decay = self.sigma_decay
            return (
                gaudi_mask_with_decay(self.out_widths, self.out_starts, m, decay, False, tile),
                gaudi_mask_with_decay(self.in_widths, self.in_starts, n, decay, False, tile),
            )
        decay = self.sigma_decay.reshape(1)
        if m == n:
            out_mask, in_mask = rounded_gaudi_masks(
                [self.out_widths, self.in_widths], [self.out_starts, self.in_starts], decay.expand(2), m, tile
            )
            return out_mask, in_mask
        return (
            rounded_gaudi_masks([self.out_widths], [self.out_starts], decay, m, tile)[0],
            rounded_gaudi_masks([self.in_widths], [self.in_starts], decay, n, tile)[0],
        )

    def _hard_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma
        return (
            hard_mask(self.out_widths, self.out_starts, self.out_features, sigma, self.tile),
            hard_mask(self.in_widths, self.in_starts, self.in_features, sigma, self.tile),
        )

    def masked_factors(self, hard: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked factors as ``(K*r, out_features)`` and ``(K*r, in_features)`` matrices.

        ``hard`` selects the eval (hard) masks; by default they follow ``self.training``.
        """
        hard = (not self.training) if hard is None else hard
        out_mask, in_mask = self._hard_masks() if hard else self._soft_masks()
        dtype = self.out_factors.dtype
        u = (self.out_factors * out_mask.to(dtype).unsqueeze(1)).reshape(-1, self.out_features)
        v = (self.in_factors * in_mask.to(dtype).unsqueeze(1)).reshape(-1, self.in_features)
        return u, v

    def _factor_support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the factors matter in eval mode: ``(K, r, m)`` and ``(K, r, n)`` boolean, inside each
        component's hard mask."""
        out_mask, in_mask = self._hard_masks()
        return ((out_mask != 0).unsqueeze(1).expand_as(self.out_factors),
                (in_mask != 0).unsqueeze(1).expand_as(self.in_factors))

    def packed_factors(self) -> dict[str, torch.Tensor]:
        """The factor entries the eval-mode function uses, flat (component, rank, position order): a
        fitted layer's full-length factors are mostly entries outside its intervals, which a save need
        not store. :meth:`unpack_factors_` puts them back."""
        out_support, in_support = self._factor_support()
        return {"out_factors": self.out_factors.detach()[out_support], "in_factors": self.in_factors.detach()[in_support]}

    def unpack_factors_(self, out_factors: torch.Tensor, in_factors: torch.Tensor) -> None:
        """Set the factors from :meth:`packed_factors` of a layer with this structure (widths, starts and
        sigma already in place); the entries outside the eval masks become zero, so the eval-mode
        function is the packed layer's exactly."""
        supports = self._factor_support()
        for name, values, support in zip(("out_factors", "in_factors"), (out_factors, in_factors), supports):
            if values.dim() != 1 or values.numel() != int(support.sum()):
                raise ValueError(f"packed {name} has shape {tuple(values.shape)}; this layer's structure "
                                 f"needs {int(support.sum())} entries")
        with torch.no_grad():
            for target, values, support in zip((self.out_factors, self.in_factors), (out_factors, in_factors), supports):
                target.zero_()
                target[support] = values.to(device=target.device, dtype=target.dtype)
        self._eval_cache = None

    def pack_for_training_(self) -> bool:
        """Train the factor entries the eval function uses (:meth:`packed_factors`) as two packed
        parameters, ``out_packed`` and ``in_packed``, instead of the full-length factors, which for a
        finely tiled layer hold several times more entries than the dense weight: gradients and the
        optimizer then cost the layer's effective parameters. Only while the structure is frozen with
        exact masks (``sigma=None``); returns False and changes nothing otherwise.
        :meth:`unpack_after_training_` writes the trained entries back."""
        blocks = self._frozen_blocks() if self.structure_frozen() and self._packed is None else None
        if blocks is None:
            return False
        out_support, in_support = (support.reshape(-1).nonzero().squeeze(1) for support in self._factor_support())
        positions = []
        for support, factors in ((out_support, self.out_factors), (in_support, self.in_factors)):
            position = torch.full((factors.numel() + 1,), len(support), dtype=torch.long, device=support.device)
            position[support] = torch.arange(len(support), device=support.device)
            positions.append(position)
        # the entries of packed_factors(), in its order, from the supports already at hand
        self.out_packed = nn.Parameter(self.out_factors.detach().reshape(-1)[out_support].clone())
        self.in_packed = nn.Parameter(self.in_factors.detach().reshape(-1)[in_support].clone())
        self._packed = _PackedTraining(blocks.repointed(*positions), out_support, in_support,
                                       (self.out_factors.requires_grad, self.in_factors.requires_grad))
        self.out_factors.requires_grad_(False)
        self.in_factors.requires_grad_(False)
        return True

    def unpack_after_training_(self) -> None:
        """Write the packed parameters back into the full-length factors and remove them."""
        if self._packed is None:
            return
        out_values, in_values = self.out_packed.detach(), self.in_packed.detach()
        del self.out_packed, self.in_packed
        for factors, trained in zip((self.out_factors, self.in_factors), self._packed.requires_grad):
            factors.requires_grad_(trained)
        self._packed = None
        self.unpack_factors_(out_values, in_values)

    def _packed_masked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``masked_factors(hard=True)`` of the packed parameters (differentiable)."""
        k, r, m, n = self.num_components, self.rank, self.out_features, self.in_features
        u = self.out_packed.new_zeros(k * r * m).index_put((self._packed.out_support,), self.out_packed)
        v = self.in_packed.new_zeros(k * r * n).index_put((self._packed.in_support,), self.in_packed)
        return u.view(k * r, m), v.view(k * r, n)

    def effective_weight(self, hard: bool | None = None) -> torch.Tensor:
        u, v = self.masked_factors(hard)
        return u.T @ v

    def to_dense(self) -> torch.Tensor:
        return self.effective_weight()

    def block_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The factored computation the counted cost describes: each active component multiplies only
        its input interval and adds into its output interval (as two rank-r products, or as one dense
        block where that is cheaper). Equals the eval forward for ``sigma=None`` (boxcar masks); a
        reference for cost accounting, one component at a time (the compact inference form is faster).
        """
        self._check_input(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        y = flat.new_zeros(flat.shape[0], self.out_features)
        out_sizes, in_sizes = self.interval_sizes()
        out_offsets = interval_offsets(self.out_starts, self.out_features, self.tile)
        in_offsets = interval_offsets(self.in_starts, self.in_features, self.tile)
        for k in (self.active_components()).nonzero().flatten().tolist():
            h, w = int(out_sizes[k]), int(in_sizes[k])
            rows = (int(out_offsets[k]) + torch.arange(h, device=x.device)) % self.out_features
            cols = (int(in_offsets[k]) + torch.arange(w, device=x.device)) % self.in_features
            u, v = self.out_factors[k][:, rows], self.in_factors[k][:, cols]  # (r, h), (r, w)
            xk = flat[:, cols]
            if self.rank * (h + w) <= h * w:
                contribution = (xk @ v.T) @ u
            else:
                contribution = xk @ (v.T @ u)
            y = y.index_add(1, rows, contribution)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _cached_eval_weight(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.effective_weight(hard=True)
        key = _state_key([*self.factor_parameters(), *self.structure_parameters(), self.sigma_decay])
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():
                self._eval_cache = (key, self.effective_weight(hard=True))
        return self._eval_cache[1]

    def structure_frozen(self) -> bool:
        """True while widths and starts do not train (``requires_grad`` off, as in recovery
        fine-tuning): the training forward then computes the eval-mode weight from the factors cropped to
        their intervals (:mod:`gblr.structured.frozen_blocks`) and trains the factors of that function."""
        return not any(p.requires_grad for p in self.structure_parameters())

    def _frozen_blocks(self) -> FrozenBlocks | None:
        """The index tables of the hard structure, rebuilt when widths, starts or sigma change; None for a
        finite sigma (masks with tails, not boxcars)."""
        key = _state_key([*self.structure_parameters(), self.sigma_decay])
        if self._frozen_cache is None or self._frozen_cache[0] != key:
            blocks = None
            if self.sigma is None:  # one read of the device per structure change
                blocks = FrozenBlocks(self.out_widths, self.out_starts, self.in_widths, self.in_starts, self.rank,
                                      self.out_features, self.in_features, self.tile).to(self.out_factors.device)
            self._frozen_cache = (key, blocks)
        return self._frozen_cache[1]

    def _apply(self, fn, recurse=True):
        # Keep widths and starts in at least float32 when the model is cast to half precision: in
        # bfloat16 a width cannot even resolve one row of a 512-row layer.
        super()._apply(fn, recurse)
        for p in self.structure_parameters():
            if p.dtype != _structure_dtype(p.dtype):
                p.data = p.data.to(_structure_dtype(p.dtype))
        return self

    def train(self, mode: bool = True) -> "GBLRLinear":
        self._eval_cache = None
        return super().train(mode)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        m, n, kr = self.out_features, self.in_features, self.num_components * self.rank
        tokens = x.numel() // n
        if self._packed is not None:  # frozen structure, packed factors (recovery): the eval function
            frozen, factors = self._packed.blocks, (self.out_packed, self.in_packed)
        elif not self.training:
            return F.linear(x, self._cached_eval_weight(), self.bias)
        else:
            frozen, factors = None, (self.out_factors, self.in_factors)
            if self.structure_frozen() and not torch.compiler.is_compiling():
                frozen = self._frozen_blocks()
        # Build W and multiply (tokens*m*n), or two skinny matmuls (tokens*kr*(m+n)). Frozen structure:
        # the eval-mode function, W from the cropped blocks (frozen.macs) and hard masks; else W costs kr*m*n.
        build = kr * m * n if frozen is None else frozen.macs
        if build + tokens * m * n < tokens * kr * (m + n):
            if frozen is not None:
                return F.linear(x, frozen.weight(*factors), self.bias)
            if self.shared is not None:
                return F.linear(x, self.shared.weight(self), self.bias)
            return F.linear(x, masked_product(self.out_factors, self.in_factors, *self._soft_masks()), self.bias)
        u, v = self._packed_masked_factors() if self._packed is not None else self.masked_factors(hard=frozen is not None)
        return F.linear(F.linear(x, v), u.T, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, num_components={self.num_components}, rank={self.rank}, "
            f"sigma={self.sigma}" + (f", tile={self.tile}" if self.tile > 1 else "")
        )


@dataclass
class _PackedTraining:
    """What :meth:`GBLRLinear.pack_for_training_` keeps: the frozen blocks reading the packed vectors, the
    flat positions of the packed entries in the full-length factors, their ``requires_grad`` before."""

    blocks: FrozenBlocks
    out_support: torch.Tensor
    in_support: torch.Tensor
    requires_grad: tuple[bool, bool]


class _MaskedProduct(torch.autograd.Function):
    """``W = (U * mask_out)^T (V * mask_in)`` summed over components and ranks, for factors ``(..., K, r, m)``,
    ``(..., K, r, n)`` and masks ``(..., K, m)``, ``(..., K, n)`` (a leading batch of same-shape layers is
    one batched product). One graph node with a hand-written backward: the autograd composition of the
    same products costs about twice as many operations."""

    @staticmethod
    def forward(ctx, u, v, out_mask, in_mask):
        masked_u = u * out_mask.to(u.dtype).unsqueeze(-2)
        masked_v = v * in_mask.to(v.dtype).unsqueeze(-2)
        ctx.save_for_backward(u, v, out_mask, in_mask, masked_u, masked_v)
        return masked_u.flatten(-3, -2).mT @ masked_v.flatten(-3, -2)

    @staticmethod
    def backward(ctx, grad):
        u, v, out_mask, in_mask, masked_u, masked_v = ctx.saved_tensors
        grad = grad.to(u.dtype)  # the product may have run under autocast
        grad_masked_u = (masked_v.flatten(-3, -2) @ grad.mT).view_as(u)
        grad_masked_v = (masked_u.flatten(-3, -2) @ grad).view_as(v)
        grads = [None] * 4
        if ctx.needs_input_grad[0]:
            grads[0] = grad_masked_u * out_mask.to(u.dtype).unsqueeze(-2)
        if ctx.needs_input_grad[1]:
            grads[1] = grad_masked_v * in_mask.to(v.dtype).unsqueeze(-2)
        if ctx.needs_input_grad[2]:
            grads[2] = (grad_masked_u * u).sum(-2).to(out_mask.dtype)
        if ctx.needs_input_grad[3]:
            grads[3] = (grad_masked_v * v).sum(-2).to(in_mask.dtype)
        return tuple(grads)


def masked_product(out_factors, in_factors, out_mask, in_mask) -> torch.Tensor:
    """The effective weight ``(..., out_features, in_features)`` of factors and masks of one GBLR layer,
    or of a stack of same-shape layers (leading dimension)."""
    return _MaskedProduct.apply(out_factors, in_factors, out_mask, in_mask)


def _state_key(tensors: list[torch.Tensor]) -> tuple:
    """Changes whenever one of ``tensors`` is modified in place, replaced, cast or moved (for caches)."""
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


def _structure_dtype(dtype: torch.dtype) -> torch.dtype:
    """Widths and starts use float64 in float64 layers and float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _interval_tensor(name: str, intervals, k: int, length: int) -> torch.Tensor:
    iv = torch.as_tensor(intervals, dtype=torch.float64)
    if iv.shape != (k, 2):
        raise ValueError(f"{name} must hold {k} (start, size) pairs, got shape {tuple(iv.shape)}")
    if (iv != iv.round()).any() or (iv[:, 1] < 0).any() or (iv[:, 1] > length).any():
        raise ValueError(f"{name} must be integer (start, size) pairs with 0 <= size <= {length}, got {intervals!r}")
    iv[:, 0] = torch.remainder(iv[:, 0], length)
    return iv
