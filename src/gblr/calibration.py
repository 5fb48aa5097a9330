"""What a layer's inputs look like on calibration data, for fits that minimise the error of its outputs.

The output error of a replaced weight on inputs ``X`` (tokens x in) is ``||(W_fit - W) X^T||_F``, which
depends on the inputs only through their second moment ``G = X^T X / tokens`` (in x in). :func:`input_grams`
accumulates ``G`` for chosen layers while any code runs the model on calibration data, so memory stays
one ``in x in`` matrix per layer however many tokens are streamed (layers fed the same tensor, such as
attention's q, k and v, share one product per batch).

Fitting layers one at a time while earlier ones are already replaced ("sequential" fits) needs the
inputs ``X~`` a layer receives in the partly replaced model beside the inputs ``X`` of the original:
the output error ``||X~ W_fit^T - X W^T||`` is minimised by fitting the corrected weight
``W C G~^-1`` under ``G~``, with ``C = X^T X~ / tokens`` and ``G~ = X~^T X~ / tokens``, which
:func:`paired_moments` streams from both models run side by side on the same batches.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch
from torch import nn

from .structured.base import check_positive

__all__ = ["input_grams", "paired_moments", "corrected_weight", "damped", "whitening"]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A layer's inputs as (tokens x features) float64 rows."""
    return x.detach().reshape(-1, x.shape[-1]).double()


@torch.no_grad()
def input_grams(model: nn.Module, layers: dict[str, nn.Module], run: Callable[[nn.Module], object],
                groups: list | None = None) -> dict[str, torch.Tensor]:
    """``{name: X^T X / tokens}`` (float64, on the CPU) of each layer's inputs while ``run(model)`` runs.

    ``layers`` maps qualified names to modules of ``model`` whose last input dimension is their input
    features (linear layers). A layer that saw no input is an error naming it. ``groups``, when a list,
    receives the layer names in the order of their first call, as lists of the layers fed one tensor
    (attention's q, k and v): the order in which :func:`paired_moments` can fit them one group at a time.
    """
    sums: dict[str, list] = {}  # name -> [sum of x^T x, tokens]
    last: list = [None, None]  # the latest input and its product: q, k and v reuse it
    order: list[list[str]] = []

    def hook(name):
        def record(module, args):
            x = args[0]
            if name not in sums:
                if last[0] is x and order:
                    order[-1].append(name)
                else:
                    order.append([name])
            if last[0] is not x:
                flat = _flat(x)
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
    if groups is not None:
        groups[:] = order
    return {name: sums[name][0] / sums[name][1] for name in layers}


class _SideBySide(nn.Module):
    """Runs the reference, then the model, on each call (the same arguments); returns the model's output."""

    def __init__(self, reference: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.reference, self.model = reference, model

    def forward(self, *args, **kwargs):
        self.reference(*args, **kwargs)
        return self.model(*args, **kwargs)


@torch.no_grad()
def paired_moments(reference: nn.Module, model: nn.Module, names: list[str], run: Callable[[nn.Module], object]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (X^T X~ / tokens, X~^T X~ / tokens)}`` (float64, on the CPU), with ``X`` the inputs of layer
    ``name`` in ``reference`` and ``X~`` those of the same layer in ``model`` on the same calibration data.

    ``run`` is called once, with a module that runs ``reference`` and then ``model`` on every call it gets
    and returns ``model``'s output (so ``run`` must only call it, as :func:`input_grams`'s runs do); the
    products are accumulated batch by batch, so memory stays two ``in x in`` matrices per layer.
    """
    pending: dict[str, deque] = {name: deque() for name in names}  # the reference's inputs not yet paired
    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name in names}  # [x^T x~, x~^T x~, tokens]

    def from_reference(name):
        def record(module, args):
            pending[name].append(_flat(args[0]))
        return record

    def from_model(name):
        def record(module, args):
            if not pending[name]:
                raise RuntimeError(f"calibration: layer {name!r} ran more often in the model than in the reference")
            x, x_model = pending[name].popleft(), _flat(args[0])
            if x.shape != x_model.shape:
                raise RuntimeError(f"calibration: layer {name!r} got inputs of shape {tuple(x_model.shape)} "
                                   f"against {tuple(x.shape)} in the reference")
            entry = sums[name]
            entry[0] = entry[0] + (x.T @ x_model).cpu()
            entry[1] = entry[1] + (x_model.T @ x_model).cpu()
            entry[2] += x.shape[0]
        return record

    handles = [reference.get_submodule(name).register_forward_pre_hook(from_reference(name)) for name in names]
    handles += [model.get_submodule(name).register_forward_pre_hook(from_model(name)) for name in names]
    try:
        run(_SideBySide(reference, model))
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if not sums[name][2]]
    if missing:
        raise ValueError(f"calibration: layer {missing[0]!r} received no input; check the calibration run")
    return {name: (cross / tokens, gram / tokens) for name, (cross, gram, tokens) in sums.items()}


def corrected_weight(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """``W C G~^-1`` (float64, CPU): the weight whose outputs on the inputs ``X~`` come closest to ``W``'s
    outputs on the original inputs ``X``. Fitting it under ``G~`` minimises the fit's error against the
    original outputs (the remainder does not depend on the fit). Computed as ``W + W (C - G~) G~^-1`` with
    ``G~`` damped as in :func:`damped`, so that unchanged inputs (``C = G~``) give ``W`` back exactly."""
    features = weight.shape[1]
    if tuple(cross.shape) != (features, features):
        raise ValueError(f"cross must be {features}x{features} (inputs x inputs), got {tuple(cross.shape)}")
    weight = weight.detach().double().cpu()
    change = weight @ (cross.double() - gram.double())
    return weight + torch.linalg.solve(damped(gram, damping, features), change.T).T  # G~ is symmetric


def damped(gram: torch.Tensor, damping: float = 0.01, features: int | None = None) -> torch.Tensor:
    """``G + damping * mean(diag G) * I`` in float64 on the CPU: the second moment the data-aware fits use.
    Its Cholesky factor ``L`` turns the output error into a Frobenius norm, ``||E X^T||^2 ~ ||E L||^2``;
    the damping keeps directions the calibration data never visited from being ignored entirely.
    ``features``, when given, is the layer's number of inputs the matrix must match."""
    check_positive("damping", damping)
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
