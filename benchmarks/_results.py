"""What every benchmark records next to its numbers (the exact command, date, machine and torch version),
and helpers the benchmarks share."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def run_metadata(machine_note: str, **extra) -> dict:
    return {
        "command": "python " + shlex.join(sys.argv),  # quoted: the line can be pasted back
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {machine_note}",
        "torch": torch.__version__,
        **extra,
    }


def provenance(meta: dict) -> str:
    return f"`{meta['command']}` on {meta['date']}, {meta['machine']}, torch {meta['torch']}."


def write_results(name: str, meta: dict, rows: list[dict], markdown_lines: list[str]) -> None:
    """benchmarks/results/NAME.json (metadata + rows) and NAME.md (the generated table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    _replace(RESULTS / f"{name}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    _replace(RESULTS / f"{name}.md", "\n".join(markdown_lines) + "\n")


def _replace(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file: a process stopped while writing leaves the old file whole."""
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(text)
    os.replace(temporary, path)


def device_note(device: torch.device) -> str:
    """The provenance words for ``device``: the GPU's name and CUDA version, or the CPU threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"CPU, {torch.get_num_threads()} torch threads"


def graphed(call, calls: int = 1):
    """``calls`` runs of ``call()`` captured in one CUDA graph, after a warm-up on the capturing stream
    (as torch advises); returns the replay, which launches them all with no host work per call, so its
    time is the GPU's alone."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            call()
    return graph.replay


def synchronize(device: torch.device) -> None:
    """Wait for the GPU before reading a clock (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def selected_methods(methods: list[tuple], words: list[str]) -> list[tuple]:
    """The methods whose label (first field) contains one of ``words``; all of them for ``["all"]``."""
    return [m for m in methods if "all" in words or any(word in m[0] for word in words)]


def monarch_dense_execution(model) -> None:
    """Monarch layers run through their dense weight: same outputs, many times faster here (see
    ``StructuredLinear.dense_execution``)."""
    from gblr.structured import MonarchLinear

    for module in model.modules():
        if isinstance(module, MonarchLinear):
            module.dense_execution = True
