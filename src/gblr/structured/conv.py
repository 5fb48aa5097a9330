"""Structured convolutions: a ``Conv2d`` whose weight is one or more structured matrices.

A convolution is a linear layer applied to every output pixel's patch of input (its receptive field,
``in_channels * kh * kw`` values). :class:`StructuredConv2d` holds structured layers of any family for
that linear map, so everything the linear layers do — budgets, the structure learner, cost accounting
(one token per output pixel), ``compact``, save and load — works for convolutions unchanged. Two
layouts of the weight ``(out, in, kh, kw)``:

- ``"matrix"``: one ``out x (in * kh * kw)`` matrix (PyTorch's own flattening: a column interval
  covers whole input channels with all their taps);
- ``"taps"``: one ``out x in`` matrix per kernel tap, summed (each tap gets its own structure).

While training, the layers' effective weight (differentiable in every parameter, structure included)
is convolved with the input by the backend's convolution, which is far faster than multiplying
unfolded patches; compact inference layers (``executes_structure``) run on the unfolded patches, as
their counted cost describes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import StructuredLinear

__all__ = ["StructuredConv2d", "GBLRConv2d", "LAYOUTS", "conv_matrices", "conv_unsupported", "conv_geometry",
           "check_layout"]

LAYOUTS = ("matrix", "taps")


def check_layout(layout, name: str = "layout") -> None:
    """A one-line error naming ``name`` unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"{name} must be one of {LAYOUTS}, got {layout!r}")


def _pair(value, name: str, smallest: int = 1) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < smallest for v in pair):
        raise ValueError(f"{name} must be an integer >= {smallest} or a pair of them, got {value!r}")
    return pair


def conv_unsupported(conv: nn.Module) -> str | None:
    """Why ``conv`` (an ``nn.Conv2d``) cannot become a :class:`StructuredConv2d`, or None if it can."""
    if conv.groups != 1:
        return f"Conv2d with groups={conv.groups} (only groups=1 is supported)"
    if conv.padding_mode != "zeros":
        return f"Conv2d with padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    if isinstance(conv.padding, str) and conv.padding == "same":
        if any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
            return "Conv2d with padding='same' and an even receptive field (asymmetric padding)"
    return None


def conv_geometry(conv: nn.Conv2d) -> dict:
    """Channels, kernel, stride, integer padding and dilation of a convertible ``nn.Conv2d`` (as
    :meth:`StructuredConv2d.geometry` writes them, layout aside)."""
    problem = conv_unsupported(conv)
    if problem:
        raise ValueError(f"cannot structure a {problem}")
    if conv.padding == "valid":
        padding = (0, 0)
    elif conv.padding == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    else:
        padding = tuple(conv.padding)
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride), "padding": list(padding), "dilation": list(conv.dilation)}


def conv_matrices(weight: torch.Tensor, layout: str) -> list[torch.Tensor]:
    """The matrices of a ``(out, in, kh, kw)`` convolution weight in ``layout``: ``[W.reshape(out, -1)]``
    or one ``(out, in)`` matrix per tap (row-major over the kernel)."""
    check_layout(layout)
    if layout == "matrix":
        return [weight.reshape(weight.shape[0], -1)]
    return [weight[:, :, i, j] for i in range(weight.shape[2]) for j in range(weight.shape[3])]


class StructuredConv2d(nn.Module):
    """Drop-in for :class:`torch.nn.Conv2d` (``groups=1``, zero padding) computing with structured layers.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation: as in ``nn.Conv2d``
            (``padding`` as integers).
        linears: the structured layers: one of ``in_channels * kh * kw -> out_channels`` (layout
            ``"matrix"``) or ``kh * kw`` of ``in_channels -> out_channels`` (layout ``"taps"``, row-major
            over the kernel; a bias, if any, belongs to the first).
        layout: ``"matrix"`` or ``"taps"``.

    Cost: the layers' MACs per token, per output pixel (:meth:`macs_per_pixel`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, linears, *, stride=1, padding=0,
                 dilation=1, layout: str = "matrix") -> None:
        super().__init__()
        check_layout(layout)
        self.in_channels, self.out_channels, self.layout = in_channels, out_channels, layout
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding", smallest=0)
        self.dilation = _pair(dilation, "dilation")
        taps = self.kernel_size[0] * self.kernel_size[1]
        expected = [(in_channels * taps, out_channels)] if layout == "matrix" else [(in_channels, out_channels)] * taps
        linears = list(linears)
        shapes = [(getattr(m, "in_features", None), getattr(m, "out_features", None)) for m in linears]
        if not all(isinstance(m, StructuredLinear) for m in linears) or shapes != expected:
            raise ValueError(f"layout {layout!r} of a {in_channels}->{out_channels} {self.kernel_size} convolution needs "
                             f"structured layers of (in, out) {expected[:1]} x {len(expected)}, got {shapes}")
        if layout == "taps" and any(getattr(m, "bias", None) is not None for m in linears[1:]):
            raise ValueError("layout 'taps': only the first tap's layer may have a bias")
        self.linears = nn.ModuleList(linears)

    @classmethod
    def like(cls, conv: nn.Conv2d, linears, layout: str = "matrix") -> "StructuredConv2d":
        """A structured layer with the geometry (channels, kernel, stride, padding, dilation) of ``conv``."""
        return cls(**conv_geometry(conv), linears=linears, layout=layout)

    def geometry(self) -> dict:
        """What, with the layers, rebuilds this module (saved by :func:`gblr.io.save`)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "layout": self.layout}

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip((height, width), self.padding, self.dilation, self.kernel_size, self.stride)
        )

    # --- cost ------------------------------------------------------------------------------------
    def macs_per_pixel(self) -> int:
        """Multiply-accumulates per output pixel (all output channels), bias excluded."""
        return sum(layer.macs_per_token() for layer in self.linears)

    @property
    def dense_macs_per_pixel(self) -> int:
        return self.out_channels * self.in_channels * math.prod(self.kernel_size)

    def relative_cost(self) -> float:
        return self.macs_per_pixel() / self.dense_macs_per_pixel

    def effective_parameters(self) -> int:
        return sum(layer.effective_parameters() for layer in self.linears)

    def to_dense(self) -> torch.Tensor:
        """The ``(out, in, kh, kw)`` weight this layer currently convolves with."""
        kh, kw = self.kernel_size
        if self.layout == "matrix":
            return self.linears[0].to_dense().reshape(self.out_channels, self.in_channels, kh, kw)
        taps = torch.stack([layer.to_dense() for layer in self.linears], dim=-1)
        return taps.reshape(self.out_channels, self.in_channels, kh, kw)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if not any(getattr(layer, "executes_structure", True) for layer in self.linears):
            y = F.conv2d(x, self.to_dense(), self.linears[0].bias, self.stride, self.padding, self.dilation)
            return y[0] if unbatched else y
        n, _, height, width = x.shape
        out_h, out_w = self.output_size(height, width)
        # (N, in * kh * kw, pixels) -> one row per output pixel: the layers' tokens.
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride).transpose(1, 2)
        if self.layout == "matrix":
            y = self.linears[0](patches)
        else:
            taps = patches.unflatten(-1, (self.in_channels, len(self.linears)))
            y = self.linears[0](taps[..., 0])
            for t in range(1, len(self.linears)):
                y = y + self.linears[t](taps[..., t])
        y = y.transpose(1, 2).reshape(n, self.out_channels, out_h, out_w)
        return y[0] if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, layout={self.layout!r}")


def GBLRConv2d(in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True,
               *, layout: str = "matrix", device=None, dtype=None, **options) -> StructuredConv2d:
    """A drop-in for ``nn.Conv2d(in, out, kernel_size, stride, padding, dilation, bias=bias)`` whose weight is
    a learnable GBLR matrix (``layout="matrix"``) or one per kernel tap (``"taps"``); ``options`` go to
    :class:`GBLRLinear` (``num_components``, ``rank``, ``width_init``, ``tile``, ...). Like a new
    ``GBLRLinear``, it starts FLOPs-neutral; the structure learner shrinks it to a budget."""
    from .gblr import GBLRLinear

    kh, kw = _pair(kernel_size, "kernel_size")
    check_layout(layout)
    factory = {"device": device, "dtype": dtype}
    if layout == "matrix":
        linears = [GBLRLinear(in_channels * kh * kw, out_channels, bias=bias, **options, **factory)]
    else:
        linears = [GBLRLinear(in_channels, out_channels, bias=bias and t == 0, **options, **factory) for t in range(kh * kw)]
    return StructuredConv2d(in_channels, out_channels, (kh, kw), linears, stride=stride, padding=padding,
                            dilation=dilation, layout=layout)
