"""A stand-in CUDA GPU for Triton, to work on the compact kernels' host side on a machine without one.

Triton compiles for a GPU it is told about whether or not one is present; only launching needs a
driver. :func:`install` gives Triton one that reports an sm_90 GPU (H100/H200) and, in place of each
launch, records what Triton's launcher was given and calls ``on_launch`` with the kernel's arguments
(to play the kernel's part, e.g. write its output), between the launch hooks as Triton's launchers
call them. Tensors stay on the CPU; nothing runs on a GPU.

Used by the tests (the direct launches of :mod:`gblr.compact_kernel` pass the launcher what Triton's
own launch passes, but for the launch metadata that only hooks read) and by
``benchmarks/kernel_host_time.py`` (the host's share of a launch).
Install it in a process of its own: it replaces Triton's driver for good, and Triton's interpreter
(``TRITON_INTERPRET=1``) must be off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Launcher arguments before the kernel's own: grid (3), stream, function, packed metadata, launch
#: metadata, enter and exit hooks.
LAUNCHER_PREFIX = 9


def install(on_launch: Callable[[tuple], None] | None = None, record: bool = True) -> list[list]:
    """Make Triton launch on the stand-in GPU; returns the list each launch is recorded into (its
    launcher arguments, tensors as ``("tensor", data_ptr)``, other objects by type name; nothing
    unless ``record``: recording takes longer than a launch)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    launched: list[list] = []

    def recorded(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", value.data_ptr())
        if isinstance(value, (bool, int, float, str, tuple, type(None))):
            return value
        return type(value).__name__  # e.g. the launch metadata, a fresh object each launch

    class Utils:
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132}

        @staticmethod
        def load_binary(name, kernel, shared, device):
            return 1, 2, 64, 0, 1024  # module, function, registers, spills, most threads per program

    class StandInDriver:
        utils = Utils()

        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(device=None):
            return 7

        @staticmethod
        def get_current_target():
            return GPUTarget("cuda", 90, 32)

        @staticmethod
        def launcher_cls(src, metadata):
            def launch(*given):
                launch_metadata, enter_hook, exit_hook = given[6:LAUNCHER_PREFIX]
                if enter_hook is not None:  # as Triton's launchers do around the launch
                    enter_hook(launch_metadata)
                if record:
                    launched.append([recorded(value) for value in given])
                if on_launch is not None:
                    on_launch(given[LAUNCHER_PREFIX:])
                if exit_hook is not None:
                    exit_hook(launch_metadata)
            return launch

    driver.set_active(StandInDriver())
    return launched
