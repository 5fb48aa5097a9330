"""Pictures of learned GBLR structure: for each layer, how many components cover each weight entry."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..learn import gblr_layers

__all__ = ["coverage", "save_structure_pictures"]


@torch.no_grad()
def coverage(layer) -> torch.Tensor:
    """(out, in) count of the components whose hard blocks contain each entry (0 = pruned, >1 = overlap)."""
    from ..mask import boxcar_mask

    out_mask = boxcar_mask(layer.out_widths, layer.out_starts, layer.out_features, layer.tile)
    in_mask = boxcar_mask(layer.in_widths, layer.in_starts, layer.in_features, layer.tile)
    active = layer.active_components().to(out_mask.dtype)
    return (out_mask * active[:, None]).T @ in_mask


def save_structure_pictures(model: nn.Module, path) -> Path | None:
    """One panel per GBLR layer; returns the PNG path, or None without GBLR layers or matplotlib."""
    layers = gblr_layers(model)
    if not layers:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    columns = min(5, len(layers))
    rows = math.ceil(len(layers) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for axis, (name, layer) in zip(axes.flat, layers):
        image = axis.imshow(coverage(layer).cpu().numpy(), cmap="viridis", interpolation="nearest", aspect="auto")
        axis.set_title(f"{name}\ncost {layer.relative_cost():.2f}", fontsize=7)
        axis.set_xticks([]), axis.set_yticks([])
        figure.colorbar(image, ax=axis, fraction=0.046)
    for axis in list(axes.flat)[len(layers):]:
        axis.axis("off")
    figure.suptitle("components covering each weight (rows: outputs, columns: inputs)", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
