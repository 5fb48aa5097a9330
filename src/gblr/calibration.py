"""What a layer's inputs look like on calibration data, for fits that minimise the error of its outputs.

The output error of a replaced weight on inputs ``X`` (tokens x in) is ``||(W_fit - W) X^T||_F``, which
depends on the inputs only through their second moment ``G = X^T X / tokens`` (in x in). :func:`input_grams`
accumulates ``G`` for chosen layers while any code runs the model on calibration data, so memory stays
one ``in x in`` matrix per layer however many tokens are streamed (layers fed the same tensor, such as
attention's q, k and v, share one product per batch).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

__all__ = ["input_grams", "damped", "whitening"]


@torch.no_grad()
def input_grams(model: nn.Module, layers: dict[str, nn.Module], run: Callable[[nn.Module], object]
                ) -> dict[str, torch.Tensor]:
    """``{name: X^T X / tokens}`` (float64, on the CPU) of each layer's inputs while ``run(model)`` runs.

    ``layers`` maps qualified names to modules of ``model`` whose last input dimension is their input
    features (linear layers). A layer that saw no input is an error naming it.
    """
    sums: dict[str, list] = {}  # name -> [sum of x^T x, tokens]
    last: list = [None, None]  # the latest input and its product: q, k and v reuse it

    def hook(name):
        def record(module, args):
            x = args[0]
            if last[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).double()
                last[0], last[1] = x, ((flat.T @ flat).cpu(), flat.shape[0])
            gram, tokens = last[1]
            if name in sums:
                sums[name][0] += gram
                sums[name][1] += tokens
            else:
                sums[name] = [gram.clone(), tokens]
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        run(model)
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    missing = [name for name in layers if name not in sums or not sums[name][1]]
    if missing:
        raise ValueError(f"calibration: layer {missing[0]!r} received no input; check the calibration run")
    return {name: sums[name][0] / sums[name][1] for name in layers}


def damped(gram: torch.Tensor, damping: float = 0.01, features: int | None = None) -> torch.Tensor:
    """``G + damping * mean(diag G) * I`` in float64 on the CPU: the second moment the data-aware fits use.
    Its Cholesky factor ``L`` turns the output error into a Frobenius norm, ``||E X^T||^2 ~ ||E L||^2``;
    the damping keeps directions the calibration data never visited from being ignored entirely.
    ``features``, when given, is the layer's number of inputs the matrix must match."""
    if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping > 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
    if features is not None and tuple(gram.shape) != (features, features):
        raise ValueError(f"gram must be {features}x{features} (the inputs' second moment), got {tuple(gram.shape)}")
    gram = gram.detach().double().cpu()
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or not bool(torch.isfinite(gram).all()):
        raise ValueError(f"gram must be a square matrix of finite values, got shape {tuple(gram.shape)}")
    scale = float(gram.diagonal().mean())
    return gram + damping * (scale if scale > 0 else 1.0) * torch.eye(gram.shape[0], dtype=torch.float64)


def whitening(gram: torch.Tensor, damping: float = 0.01, features: int | None = None) -> torch.Tensor:
    """The lower-triangular Cholesky factor ``L`` of :func:`damped` ``(gram)``: ``W L`` is the weight in
    the coordinates where the output error is the Frobenius error."""
    return torch.linalg.cholesky(damped(gram, damping, features))
