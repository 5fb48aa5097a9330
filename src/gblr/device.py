"""Devices and precisions by name, checked before anything is loaded: ``auto`` | ``cpu`` | ``cuda`` |
``cuda:N`` and ``fp32`` | ``bf16`` (autocast), as every entry point (train, compress, benchmarks) takes them."""

from __future__ import annotations

import contextlib
import re

import torch

__all__ = ["PRECISIONS", "resolve_device", "check_precision", "autocast"]

PRECISIONS = ("fp32", "bf16")


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device called ``name``; ``auto`` is the GPU when there is one. Under torchrun (``local_rank``
    given) ``cuda`` means this process's GPU, ``cuda:LOCAL_RANK``. A one-line error for an unknown name,
    a GPU that is not there, or an index past the last GPU."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no usable CUDA GPU (torch {torch.__version__})")
    index = int(name.split(":")[1]) if ":" in name else (local_rank or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device cuda:{index} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` if ``device`` can run it; a one-line error otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16' is not supported by {torch.cuda.get_device_name(device)}")
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast to bfloat16 for ``bf16``; a context that does nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
