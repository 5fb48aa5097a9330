"""Re-running only what a change can reach: the blocks before a changed layer replay recorded outputs.

Calibrating a global allocation measures the loss once per layer with only that layer replaced. In a
model made of a list of blocks (a transformer's layers), the blocks before the replaced layer's block
compute exactly what they computed for the unchanged model, so :class:`BlockReplay` records every
block's outputs once and, while a layer of block ``i`` is measured, swaps blocks ``0 .. i-1`` for
modules that return those recordings: on average half of the blocks are skipped, with the same loss.

It applies only where that is safe: the blocks of one ``nn.ModuleList``, sharing no module, each called
exactly once per forward pass of the model and in list order (checked while recording), and replaying
gives back the recorded loss (checked once). Otherwise it stays off and everything runs in full.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["BlockReplay"]

log = logging.getLogger(__name__)


class _Replay(nn.Module):
    """Stands in for a block: returns its recorded outputs one call after another, whatever the input."""

    def __init__(self, outputs: list) -> None:
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, *args, **kwargs):
        if self.calls >= len(self.outputs):
            raise RuntimeError("a replayed block was called more often than while recording")
        self.calls += 1
        return self.outputs[self.calls - 1]


def _block_list(model: nn.Module, layer_names: list[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` whose items hold the most of ``layer_names`` (at least two items must hold
    some), with its name; None if there is none or its items share modules."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        prefix = f"{name}." if name else ""
        holding = {layer.removeprefix(prefix).split(".", 1)[0] for layer in layer_names if layer.startswith(prefix)}
        count = len(holding & {str(i) for i in range(len(module))})
        if count >= 2 and count > best_count:
            best, best_count = (name, module), count
    if best is None:
        return None
    seen: set[int] = set()
    for block in best[1]:
        ids = {id(m) for m in block.modules()}
        if ids & seen:  # a module in two blocks: a change inside one would reach an earlier one too
            return None
        seen |= ids
    return best


class BlockReplay:
    """Recordings of ``model``'s blocks for measuring one changed layer of ``layer_names`` at a time.

    Use::

        replay = BlockReplay(model, names)
        base = replay.record(lambda: loss_fn(model))  # runs in full, remembers every block's outputs
        model.set_submodule(name, changed)
        with replay.skipping_before(name):            # blocks before name's block replay their outputs
            loss = loss_fn(model)

    ``record`` must run the model exactly as the later measurements do (same data, same order, eval
    mode). ``enabled`` is False where replaying is not safe; everything then runs in full.
    """

    def __init__(self, model: nn.Module, layer_names: list[str]) -> None:
        self.model, self.outputs = model, None
        found = _block_list(model, layer_names)
        self.enabled = found is not None
        self.prefix, self.blocks = ("", None) if found is None else (f"{found[0]}." if found[0] else "", found[1])

    def block_of(self, layer_name: str) -> int:
        """The index of the block holding ``layer_name``; 0 (nothing to skip) for layers outside the blocks."""
        if not self.enabled or not layer_name.startswith(self.prefix):
            return 0
        head = layer_name.removeprefix(self.prefix).split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < len(self.blocks) else 0

    def record(self, run: Callable[[], float]) -> float:
        """``run()`` in full, recording every block's outputs; then, where enabled, checks that replaying
        all blocks but the last gives the same result (else replaying stays off). Returns ``run()``'s value."""
        outputs: list[list] = [[] for _ in self.blocks] if self.enabled else []
        calls: list[list[int]] = []  # block indices called in each forward pass of the model
        handles = []
        if self.enabled:
            handles.append(self.model.register_forward_pre_hook(lambda module, args: calls.append([])))
            for index, block in enumerate(self.blocks):
                handles.append(block.register_forward_hook(self._recorder(index, outputs, calls)))
        try:
            value = run()
        finally:
            for handle in handles:
                handle.remove()
        in_order = list(range(len(self.blocks or [])))
        if self.enabled and not (calls and all(c == in_order for c in calls)):
            log.info("block replay off: the blocks do not run once each, in order, per forward pass")
            self.enabled = False
        if self.enabled:
            self.outputs = outputs
            with self.skipping(len(self.blocks) - 1):
                replayed = run()
            if not math.isclose(replayed, value, rel_tol=1e-6, abs_tol=1e-9):
                log.info("block replay off: replaying changed the result (%.6g against %.6g)", replayed, value)
                self.enabled, self.outputs = False, None
        return value

    @staticmethod
    def _recorder(index: int, outputs: list[list], calls: list[list[int]]):
        def hook(module, args, output):
            if calls:
                calls[-1].append(index)
            # copies: nothing run later may change what was recorded in place
            outputs[index].append(tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, output))
        return hook

    def skipping_before(self, layer_name: str):
        """Context in which the blocks before ``layer_name``'s block replay their recorded outputs."""
        return self.skipping(self.block_of(layer_name))

    @contextlib.contextmanager
    def skipping(self, count: int):
        """Context in which blocks ``0 .. count-1`` replay their recorded outputs (nothing if disabled)."""
        if not self.enabled or self.outputs is None or count <= 0:
            yield
            return
        originals = [self.blocks[i] for i in range(count)]
        replays = [_Replay(self.outputs[i]) for i in range(count)]
        for i, replay in enumerate(replays):
            self.blocks[i] = replay
        try:
            yield
        finally:
            for i, original in enumerate(originals):
                self.blocks[i] = original
        if any(r.calls != len(r.outputs) for r in replays):
            raise RuntimeError("a replayed block was called less often than while recording: the run differs from the recorded one")
