"""Counting the ATen operations a piece of code dispatches. The count is the same on every device, so a
step's launch overhead on a GPU can be watched (and pinned by a test) on a CPU-only machine."""

from __future__ import annotations

from collections import Counter
from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "count_ops"]


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as ops: ...`` counts every ATen operation by name in ``ops.counts``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_ops(fn: Callable[[], object]) -> OpCounter:
    """Run ``fn()`` once and return the counter of the operations it dispatched."""
    with OpCounter() as counter:
        fn()
    return counter
