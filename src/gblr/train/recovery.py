"""Short recovery training after compression: a few hundred steps of distillation or fine-tuning.

The caller supplies ``batch_loss(model, step) -> loss tensor`` (e.g. MSE to the original model's
sentence embeddings, or next-token loss on text); this loop runs AdamW with warm-up and cosine decay
and gradient clipping. With ``learn_structure=True`` the GBLR widths and starts keep learning under a
:class:`gblr.learn.StructureLearner` that holds the compressed model's current cost; otherwise they are
frozen and only weights are trained. Dropout is off by default: recovery fits the original model's
function, which has none (measured on MiniLM distillation: higher cosine to the original for GBLR and
low-rank alike).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from ..device import check_precision
from ..learn import StructureLearner, gblr_layers
from ..step import make_optimizer, training_step
from ..structured.base import check_features, check_nonnegative, check_positive

__all__ = ["RecoveryResult", "recover_"]

log = logging.getLogger(__name__)


@dataclass
class RecoveryResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # per step
    cost_fraction: float | None = None  # of the GBLR layers at the end, when the structure learned


def recover_(
    model: nn.Module,
    batch_loss: Callable[[nn.Module, int], torch.Tensor],
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    learn_structure: bool = False,
    structure_lr: float = 1e-3,
    warmup: float = 0.1,
    clip: float | None = 1.0,
    progress: Callable[[int, float], None] | None = None,
    precision: str = "fp32",
    dropout: bool = False,
) -> RecoveryResult:
    """Train ``model`` in place, on the device it is on, for ``steps`` steps on ``batch_loss`` (``precision``
    ``fp32`` or ``bf16`` autocast); leaves it in eval mode. ``progress(step, loss)`` is called every step
    when given (reading the loss waits for the device). ``warmup`` is the fraction of steps the rate ramps
    up over before its cosine decay; ``clip`` the largest gradient norm (None: no clipping).
    ``dropout=False`` sets the probability of every dropout module to 0 while training (restored
    afterwards); ``True`` trains with the model's dropout."""
    check_features("steps", steps)
    check_positive("lr", lr)
    check_nonnegative("weight_decay", weight_decay)
    check_nonnegative("structure_lr", structure_lr)
    if check_nonnegative("warmup", warmup) > 1:
        raise ValueError(f"warmup must be a fraction of the steps in [0, 1], got {warmup!r}")
    if clip is not None:
        check_positive("clip", clip)
    structured = [layer for _, layer in gblr_layers(model)]
    learner, to_freeze, packed = None, [], []
    silenced = [] if dropout else [(m, m.p) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if learn_structure and not structured:
        raise ValueError("learn_structure=True needs GBLR layers in the model")
    device = next(model.parameters()).device
    check_precision(precision, device)
    try:
        if learn_structure:
            optimizer = make_optimizer(model, lr, weight_decay, structure_lr)
            fraction = sum(layer.macs_per_token() for layer in structured) / sum(layer.dense_macs_per_token for layer in structured)
            learner = StructureLearner(model, optimizer, target=min(fraction, 1.0), total_steps=steps, ramp=(0.0, 0.0))
        else:  # widths and starts get no gradients; the layers train packed factors on their frozen blocks
            to_freeze = [p for layer in structured for p in layer.structure_parameters() if p.requires_grad]
            for p in to_freeze:
                p.requires_grad_(False)
            packed = [layer for layer in structured if layer.pack_for_training_()]
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        warm = max(1, round(warmup * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        model.train()
        for module, _ in silenced:  # attention modules read their dropout's p, so zero it rather than eval()
            module.p = 0.0
        start, step_losses = time.perf_counter(), []
        for step in tqdm(range(steps), desc="recovery", disable=None, leave=False):  # a bar on a terminal only
            loss, _ = training_step(lambda: batch_loss(model, step), optimizer, schedule, learner, trainable,
                                    clip, device, precision)
            step_losses.append(loss)
            if progress is not None:
                progress(step, float(loss))
    finally:
        model.eval()
        for module, rate in silenced:
            module.p = rate
        for layer in packed:
            layer.unpack_after_training_()
        for p in to_freeze:
            p.requires_grad_(True)
        if learner is not None:
            learner.shared_masks.remove()  # leave the caller's model without our hooks
    losses = torch.stack(step_losses).float().tolist()
    fraction = learner.cost_fraction() if learner is not None else None
    log.info("recovery: %d steps, loss %.5f -> %.5f", steps, losses[0], losses[-1])
    return RecoveryResult(steps, time.perf_counter() - start, losses, fraction)
