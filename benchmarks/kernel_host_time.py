"""Host time of one compact-layer call through the Triton kernels, on a stand-in GPU (no GPU needed).

    .venv/bin/python benchmarks/kernel_host_time.py [--calls 2000] [--repeats 7]

On a GPU a layer call is asynchronous: its host time (Python, Triton's argument handling, the launches)
overlaps the GPU's work and bounds the speed wherever it is the longer of the two, e.g. a bfloat16
layer at 30 % cost and a few thousand tokens (tens of microseconds on the GPU). Here Triton compiles for
an sm_90 GPU and launches on `gblr.stand_in_gpu`, whose launcher does nothing: the times are
everything before the driver call, for the benchmark layers of compact_speed.py (768 x 3072 at cost
0.3, bfloat16), with Triton's own launch and with the direct launch of the compiled kernels, in the same
process; and the host time of the compact forward's dense and factored paths against nn.Linear.
Median over repeats of the mean over `calls` calls. Writes
benchmarks/results/kernel_host_time.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
from torch import nn
from _results import provenance, run_metadata, write_results
from compact_speed import compact_layer, gblr_at_cost, seconds_per_call

from gblr import compact_kernel, stand_in_gpu

TOKENS = 4096


def microseconds_per_call(call, calls: int, repeats: int) -> float:
    cpu = torch.device("cpu")  # nothing to wait for: the stand-in GPU runs nothing
    return statistics.median(seconds_per_call(lambda _: call(), None, cpu, calls) for _ in range(repeats)) * 1e6


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    warming_up = True

    def write_output(kernel_args):  # before timing: outputs alike, so the direct launch's check passes
        if warming_up:
            kernel_args[8].zero_()

    stand_in_gpu.install(write_output, record=False)
    compact_kernel.unavailable_reason = lambda device: None  # the stand-in GPU's tensors are CPU tensors
    rows = []
    for variant, hardware_aware in (("gblr hw (r=32, tile=32)", True), ("gblr free (r=1)", False)):
        layer = compact_layer(gblr_at_cost(768, 3072, 0.3, hardware_aware, 0), torch.device("cpu"), torch.bfloat16)
        layout, bias = layer._layout(), layer.bias
        x = torch.randn(TOKENS, 768, dtype=torch.bfloat16)
        row = {"variant": variant, "tokens": TOKENS}
        for launch in ("triton", "direct"):
            compact_kernel._direct_launch = launch == "direct"
            warming_up = True
            layout.run(x, bias)
            layer._choices[TOKENS] = "kernel"
            layer(x)
            warming_up = False
            row[f"{launch}_layout_us"] = microseconds_per_call(lambda: layout.run(x, bias), args.calls, args.repeats)
            row[f"{launch}_forward_us"] = microseconds_per_call(lambda: layer(x), args.calls, args.repeats)
        print(row, flush=True)
        rows.append(row)
    # The forward's other fast paths, on a layer so small that the products take next to nothing.
    small = compact_layer(gblr_at_cost(16, 16, 0.5, False, 0), torch.device("cpu"), torch.float32)
    linear, one = nn.Linear(16, 16), torch.randn(1, 16)
    path_rows = []
    for execution in ("dense", "factored"):
        small._choices = {1: execution}
        row = {"variant": f"16 x 16, {execution}", "tokens": 1,
               "forward_us": microseconds_per_call(lambda: small(one), args.calls, args.repeats),
               "nn_linear_us": microseconds_per_call(lambda: linear(one), args.calls, args.repeats)}
        print(row, flush=True)
        path_rows.append(row)
    meta = run_metadata(f"CPU, Triton {triton.__version__} on a stand-in sm_90 GPU", calls=args.calls,
                        repeats=args.repeats)
    lines = [
        "# Host time of a compact-layer call through the Triton kernels", "",
        f"{provenance(meta)} 768 x 3072 at cost 0.3, bfloat16, {TOKENS} tokens; two launches per call. "
        "Microseconds per call before the driver (the stand-in GPU's launcher does nothing), median of "
        f"{args.repeats} means of {args.calls} calls; `layout` is the kernels' own entry point, `forward` the "
        "compact layer's call.", "",
        "| variant | Triton's launch: layout | forward | direct launch: layout | forward |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['triton_layout_us']:.1f} | {r['triton_forward_us']:.1f} | "
                     f"{r['direct_layout_us']:.1f} | {r['direct_forward_us']:.1f} |")
    lines += ["", "The forward's dense and factored paths (float32, one token, products of next to no work), "
              "against `nn.Linear(16, 16)` in the same process, microseconds per call:", "",
              "| layer | forward | nn.Linear |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['forward_us']:.2f} | {r['nn_linear_us']:.2f} |" for r in path_rows]
    write_results("kernel_host_time", meta, rows + path_rows, lines)


if __name__ == "__main__":
    main()
