"""One optimizer step, shared by every loop that trains: the trainer, recovery fine-tuning, the learned
fit, the hidden-structure demo and the step benchmark. Forward and loss under the run's precision,
backward, gradient clipping, the optimizer, the learning-rate schedule and the structure learner.
Nothing in it reads a value back from the device, so a GPU never waits for the host; the caller reads
the loss when it logs."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .device import autocast
from .learn import StructureLearner, param_groups

__all__ = ["make_optimizer", "training_step"]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, structure_lr: float) -> torch.optim.AdamW:
    """AdamW over :func:`gblr.learn.param_groups` of ``model``, fused: one kernel per parameter group
    on CPU and GPU instead of a loop over parameters."""
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, structure_lr), fused=True)


def training_step(
    compute_loss: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    learner: StructureLearner | None = None,
    parameters: list[nn.Parameter] | None = None,
    clip: float | None = None,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, dict]:
    """Run one step; returns the loss (a tensor on the device) and the structure learner's statistics.
    ``clip``: the gradient norm of ``parameters`` is clipped to it (None: no clipping); ``device`` is
    needed for ``precision="bf16"`` only."""
    with autocast(device, precision):
        loss = compute_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(parameters, clip, foreach=True)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    stats = learner.step() if learner is not None else {}
    return loss.detach(), stats
