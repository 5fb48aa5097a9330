"""Re-running only what a change can reach: the blocks before a changed layer replay recorded outputs.

Calibrating a global allocation measures the loss once per layer with only that layer replaced. In a
model made of a list of blocks (a transformer's layers), the blocks before the replaced layer's block
compute exactly what they computed for the unchanged model, so :class:`BlockReplay` records every
block's outputs once and, while a layer of block ``i`` is measured, swaps blocks ``0 .. i-1`` for
modules that return those recordings: on average half of the blocks are skipped, with the same loss.

It applies only where that is safe: the blocks of one ``nn.ModuleList``, sharing no module, each called
exactly once per forward pass of the model and in list order (checked while recording), and replaying
gives back the recorded loss (checked once). Otherwise it stays off and everything runs in full.

:class:`RollingReplay` does the same for fits made one block after another (sequential output fits):
it keeps only the latest block's recordings of two models and also stops each run after the block
being measured, so a measurement costs about one block instead of the whole model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["BlockReplay", "RollingReplay"]

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


def _block_index(list_name: str, blocks: nn.ModuleList, layer_name: str) -> int | None:
    """The index of the block of ``blocks`` (the module named ``list_name``) holding ``layer_name``; None
    if none does."""
    prefix = f"{list_name}." if list_name else ""
    if not layer_name.startswith(prefix):
        return None
    head = layer_name.removeprefix(prefix).split(".", 1)[0]
    return int(head) if head.isdigit() and int(head) < len(blocks) else None


def _recorder(outputs: list):
    def hook(module, args, output):
        # copies: nothing run later may change what was recorded in place
        outputs.append(tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, output))
    return hook


@contextlib.contextmanager
def _call_order(model: nn.Module, blocks: nn.ModuleList | None):
    """Context yielding a function that tells whether, in the forward passes of ``model`` run inside it,
    every block ran exactly once and in list order (True when ``blocks`` is None: nothing tracked)."""
    calls: list[list[int]] = []  # block indices called in each forward pass of the model
    handles = []
    if blocks is not None:
        handles.append(model.register_forward_pre_hook(lambda module, args: calls.append([])))
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(
                lambda module, args, index=index: calls[-1].append(index) if calls else None))
    try:
        yield lambda: blocks is None or (bool(calls) and all(c == list(range(len(blocks))) for c in calls))
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _replaying(blocks: nn.ModuleList, recordings: list[list]):
    """Context in which ``blocks[i]`` returns ``recordings[i]``, call after call, for every i given."""
    originals = [blocks[i] for i in range(len(recordings))]
    replays = [_Replay(outputs) for outputs in recordings]
    for i, replay in enumerate(replays):
        blocks[i] = replay
    try:
        yield
    finally:
        for i, original in enumerate(originals):
            blocks[i] = original
    if any(r.calls != len(r.outputs) for r in replays):
        raise RuntimeError("a replayed block was called less often than while recording: the run differs from the recorded one")


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
        self.list_name, self.blocks = found or ("", None)

    def block_of(self, layer_name: str) -> int:
        """The index of the block holding ``layer_name``; 0 (nothing to skip) for layers outside the blocks."""
        return (_block_index(self.list_name, self.blocks, layer_name) or 0) if self.enabled else 0

    def record(self, run: Callable[[], float]) -> float:
        """``run()`` in full, recording every block's outputs; then, where enabled, checks that replaying
        all blocks but the last gives the same result (else replaying stays off). Returns ``run()``'s value."""
        outputs: list[list] = [[] for _ in self.blocks] if self.enabled else []
        handles = [block.register_forward_hook(_recorder(outputs[index])) for index, block in enumerate(self.blocks)
                   ] if self.enabled else []
        try:
            with _call_order(self.model, self.blocks if self.enabled else None) as in_order:
                value = run()
        finally:
            for handle in handles:
                handle.remove()
        if self.enabled and not in_order():
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

    def skipping_before(self, layer_name: str):
        """Context in which the blocks before ``layer_name``'s block replay their recorded outputs."""
        return self.skipping(self.block_of(layer_name))

    @contextlib.contextmanager
    def skipping(self, count: int):
        """Context in which blocks ``0 .. count-1`` replay their recorded outputs (nothing if disabled)."""
        if not self.enabled or self.outputs is None or count <= 0:
            yield
            return
        with _replaying(self.blocks, [self.outputs[i] for i in range(count)]):
            yield


class _Stop(Exception):
    """Raised after the last block a measurement needs: the rest of the forward pass is skipped."""


def _stop(module, args, output):
    raise _Stop


@contextlib.contextmanager
def _stopping(model: nn.Module, block: nn.Module):
    """Context in which a call of ``model`` ends after ``block`` has run, returning None."""
    own = model.__dict__.get("forward")  # a forward set on the instance (by an accelerator's hooks) stays
    forward = model.forward

    def stopped(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except _Stop:
            return None

    handle = block.register_forward_hook(_stop)
    model.forward = stopped
    try:
        yield
    finally:
        handle.remove()
        if own is None:
            del model.forward
        else:
            model.forward = own


def _same(a, b) -> bool:
    """Whether two results (nested containers of tensors and numbers) agree to rounding."""
    flat_a, spec_a = tree_flatten(a)
    flat_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor):
            scale = float(x.abs().max()) if x.numel() else 0.0
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape
                    and torch.allclose(x, y, rtol=1e-6, atol=1e-9 * scale)):
                return False
        elif x != y:
            return False
    return True


class RollingReplay:
    """Measurements on two models of one architecture, ``reference`` (never changed) and ``model`` (changed
    one block after another, in call order), that run only the blocks a measurement in block ``b`` needs:
    in both models the blocks before ``b`` return block ``b - 1``'s outputs, recorded the first time a
    run passed through it, and every call stops once block ``b`` has run (the model's call then returns
    None, so a measurement must not use what the model returns).

    Use::

        rolling = RollingReplay(reference, model, names)
        for group in groups_in_call_order:
            result = rolling.measure(group, lambda: measure_inputs(reference, model, group))
            ...  # change the group's layers in model

    Only the latest recordings are kept: memory is one block's outputs per model. Each kind of shortened
    run (stopping only; one replayed block; several) is also run in full the first time, and compared;
    where the blocks do not run once each, in list order, per forward pass, or the results differ (or the
    shortened run fails), replaying stays off and every measurement runs in full. A measurement of layers
    outside the blocks runs in full and drops the recordings (the change may reach every block).
    """

    def __init__(self, reference: nn.Module, model: nn.Module, layer_names: list[str]) -> None:
        self.reference, self.model = reference, model
        found = _block_list(model, layer_names)
        self.enabled, self.checked = found is not None, -1  # the kinds of shortened run checked so far
        self.list_name, self.blocks = found or ("", None)
        self.reference_blocks = reference.get_submodule(self.list_name) if found else None
        self.recorded, self.recordings = -1, None  # the block whose outputs (reference's, model's) are kept

    def block_of(self, layer_names: list[str]) -> int | None:
        """The block holding all of ``layer_names``; None if they lie outside the blocks or in several."""
        indices = {_block_index(self.list_name, self.blocks, name) for name in layer_names} if self.enabled else {None}
        return indices.pop() if len(indices) == 1 else None

    def measure(self, layer_names: list[str], measure: Callable[[], object]):
        """``measure()`` (which runs both models on the same data) for the layers ``layer_names``, through
        only the blocks it needs where that is known to be exact."""
        block = self.block_of(layer_names)
        if block is None:
            self.recorded, self.recordings = -1, None
            return measure()
        # what the shortened run exercises: stopping only (0), one replayed block (1), several (2); each
        # kind is checked against a full run the first time (several: the earlier ones' outputs are unused)
        replayed = self.recorded + 1 if block > self.recorded else 0
        kind = min(replayed, 2)
        if kind <= self.checked:
            with self._through(block):
                return measure()
        with _call_order(self.model, self.blocks) as in_order:
            full = measure()
        if not in_order():
            return self._off(full, "the blocks do not run once each, in order, per forward pass")
        try:
            with self._through(block):
                shortened = measure()
        except Exception as error:  # noqa: BLE001 (e.g. a run that uses the model's output)
            return self._off(full, f"the shortened run failed ({error})")
        if not _same(full, shortened):
            return self._off(full, "the shortened run measured something else")
        self.checked = kind
        return full

    def _off(self, result, reason: str):
        log.info("rolling replay off: %s", reason)
        self.enabled, self.recorded, self.recordings = False, -1, None
        return result

    @contextlib.contextmanager
    def _through(self, block: int):
        if block <= self.recorded:  # recorded before an earlier block changed: stale
            self.recorded, self.recordings = -1, None
        start, record = self.recorded, block - 1 if block - 1 > self.recorded else None
        fresh: tuple[list, list] = ([], [])
        handles = []
        with contextlib.ExitStack() as stack:
            for index, (root, blocks) in enumerate(((self.reference, self.reference_blocks), (self.model, self.blocks))):
                if start >= 0:  # blocks 0 .. start all return block start's outputs: only the last is used
                    stack.enter_context(_replaying(blocks, [self.recordings[index]] * (start + 1)))
                if record is not None:
                    handles.append(blocks[record].register_forward_hook(_recorder(fresh[index])))
                stack.enter_context(_stopping(root, blocks[block]))
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()
        if record is not None:
            self.recorded, self.recordings = record, fresh
