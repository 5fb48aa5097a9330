"""All GBLR layers of a model get their training masks and weights from a few batched calls.

Evaluated layer by layer, the masks and the masked products cost a few dozen small operations per
layer, which makes a training step launch-bound on a GPU. :func:`share_masks` installs two hooks on a
model: before each forward pass, the masks of every GBLR layer in training mode are computed together
(one :func:`gblr.mask.rounded_gaudi_masks` call per interval length), and the first layer of a shape
that asks for its effective weight gets those of all layers of that shape in one batched product.
After the pass everything is dropped, so each forward builds its own autograd graph. Layers called
outside the model's forward, and layers without straight-through rounding, work on their own as usual.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .mask import rounded_gaudi_masks
from .structured.gblr import GBLRLinear, masked_product

__all__ = ["SharedMasks", "share_masks"]


class _Stack(torch.autograd.Function):
    """``torch.stack`` whose backward is one ``unbind`` (autograd's own selects one slice per tensor)."""

    @staticmethod
    def forward(ctx, *tensors):
        return torch.stack(tensors)

    @staticmethod
    def backward(ctx, grad):
        return grad.unbind(0)


def _shape_key(layer: GBLRLinear) -> tuple:
    f = layer.out_factors
    return (layer.out_features, layer.in_features, layer.num_components, layer.rank, f.dtype, f.device)


class SharedMasks:
    """Handle of the hooks installed by :func:`share_masks`; :meth:`remove` uninstalls them."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, GBLRLinear)]
        self._groups: dict[tuple, list[GBLRLinear]] = defaultdict(list)  # same-shape layers
        self._group_of: dict[int, tuple[tuple, int]] = {}
        self._masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # stacked per group
        self._weights: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._handles = [
            model.register_forward_pre_hook(self._before_forward),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]

    # --- what the layers ask for during a forward pass ----------------------------------------------
    def masks(self, layer: GBLRLinear) -> tuple[torch.Tensor, torch.Tensor]:
        group, index = self._group_of[id(layer)]
        out_masks, in_masks = self._masks[group]
        return out_masks[index], in_masks[index]

    def weight(self, layer: GBLRLinear) -> torch.Tensor:
        group, index = self._group_of[id(layer)]
        if group not in self._weights:
            members = self._groups[group]
            self._weights[group] = masked_product(
                _Stack.apply(*(other.out_factors for other in members)),
                _Stack.apply(*(other.in_factors for other in members)),
                *self._masks[group],
            ).unbind(0)
        return self._weights[group][index]

    # --- one forward pass ----------------------------------------------------------------------------
    def compute(self) -> None:
        """Masks of every rounded GBLR layer in training mode: one batched call per (length, tile), its
        rows ordered so that the masks of same-shape layers come out stacked, ``(layers, K, length)``."""
        self.clear()
        for layer in self.layers:
            if layer.training and layer.round_to_grid:
                self._groups[_shape_key(layer)].append(layer)
        sides: dict[tuple[int, int], list[tuple[tuple, str]]] = defaultdict(list)
        for key, members in self._groups.items():
            sides[(members[0].out_features, members[0].tile)].append((key, "out"))
            sides[(members[0].in_features, members[0].tile)].append((key, "in"))
            for index, layer in enumerate(members):
                self._group_of[id(layer)] = (key, index)
                layer.shared = self
        stacked: dict[tuple[tuple, str], torch.Tensor] = {}
        for (length, tile), pieces in sides.items():
            widths, starts, decays, rows = [], [], [], []
            for key, side in pieces:
                members = self._groups[key]
                widths += [getattr(layer, f"{side}_widths") for layer in members]
                starts += [getattr(layer, f"{side}_starts") for layer in members]
                decays += [layer.sigma_decay for layer in members]
                rows.append(len(members) * members[0].num_components)
            masks = rounded_gaudi_masks(widths, starts, torch.stack(decays), length, tile, pieces=rows)
            for (key, side), mask in zip(pieces, masks):
                stacked[(key, side)] = mask.view(len(self._groups[key]), -1, length)
        for key in self._groups:
            self._masks[key] = (stacked[(key, "out")], stacked[(key, "in")])

    def clear(self) -> None:
        self._groups.clear()
        self._group_of.clear()
        self._masks.clear()
        self._weights.clear()
        for layer in self.layers:
            layer.shared = None

    def remove(self) -> None:
        self.clear()
        for handle in self._handles:
            handle.remove()

    def _before_forward(self, module, args) -> None:
        if not torch.compiler.is_compiling():  # a compiled model fuses the per-layer operations itself
            self.compute()

    def _after_forward(self, module, args, output) -> None:
        self.clear()


def share_masks(model: nn.Module) -> SharedMasks:
    """Compute the training masks and weights of all GBLR layers of ``model`` in a few batched calls per
    forward pass (same values and gradients as layer by layer, far fewer operations). Returns a handle
    whose ``remove()`` undoes it."""
    return SharedMasks(model)
