"""Small helpers on module trees shared by cost accounting, conversion, compaction and loading."""

from __future__ import annotations

from torch import nn

__all__ = ["replace_submodule"]


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` (e.g. ``"encoder.layer.0.mlp.fc1"``) inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
