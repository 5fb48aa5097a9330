"""Inference speed of compact GBLR layers (and low-rank / Monarch at the same cost) vs nn.Linear.

    .venv/bin/python benchmarks/compact_speed.py [--repeats 10] [--shapes 768x3072 3072x768 384x1536 576x1536]

For each shape (in x out), cost and token count, every variant is timed in the same process as an
``nn.Linear`` of the same shape (median of ``repeats`` after warm-up, interleaved). Reported: time
relative to nn.Linear, speedup, and the fraction of the ideal speedup (speedup x cost; 1.0 = the time
follows the FLOPs exactly). GBLR structures are random intervals shrunk to the cost by the budget
projection (as a trained layer would have): "free" = rank-1 components, K = min(in, out); "hw" =
hardware-aware, rank-32 components on 32-row/column tiles. The compact layer runs its calibrated choice
of execution (dense / factored / blocks). Writes benchmarks/results/compact_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _results import provenance, run_metadata, write_results
from torch import nn

from gblr import GBLRLinear
from gblr.compact import CompactGBLRLinear
from gblr.learn import project_to_budget
from gblr.structured import make_structured

TOKENS = (1, 64, 1024, 4096)
COSTS = (0.1, 0.3, 0.5)


def gblr_at_cost(n: int, m: int, cost: float, hardware_aware: bool, seed: int) -> GBLRLinear:
    torch.manual_seed(seed)
    options = {"rank": 32, "tile": 32} if hardware_aware else {"rank": 1}
    layer = GBLRLinear(n, m, width_init="full", **options)
    with torch.no_grad():
        layer.out_widths.uniform_(0.2, 1.0)
        layer.in_widths.uniform_(0.2, 1.0)
        layer.out_starts.uniform_(0.0, 1.0)
        layer.in_starts.uniform_(0.0, 1.0)
    project_to_budget([layer], cost * n * m)
    return layer.eval()


def median_time(fn, x, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["768x3072", "3072x768", "384x1536", "576x1536"])
    parser.add_argument("--costs", type=float, nargs="+", default=list(COSTS))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        n, m = (int(v) for v in shape.split("x"))
        dense = nn.Linear(n, m).eval()
        for cost in args.costs:
            variants = {
                "gblr free (r=1)": CompactGBLRLinear(gblr_at_cost(n, m, cost, False, 0)),
                "gblr hw (r=32, tile=32)": CompactGBLRLinear(gblr_at_cost(n, m, cost, True, 0)),
                "lowrank": make_structured("lowrank", n, m, cost).eval(),
                "monarch": make_structured("monarch", n, m, cost).eval(),
            }
            for tokens in args.tokens:
                x = torch.randn(tokens, n)
                for name, layer in variants.items():
                    for _ in range(2):
                        dense(x), layer(x)
                    ratios = []
                    for _ in range(args.repeats):  # interleaved: both see the same machine state
                        ratios.append(median_time(layer, x, 1) / median_time(dense, x, 1))
                    ratio = statistics.median(ratios)
                    reached = layer.macs_per_token() / (n * m) if name.startswith("gblr") else layer.relative_cost()
                    execution = layer.choose(tokens) if isinstance(layer, CompactGBLRLinear) else "-"
                    rows.append({
                        "shape": shape, "cost": cost, "reached_cost": reached, "tokens": tokens, "variant": name,
                        "execution": execution, "time_vs_dense": ratio, "speedup": 1 / ratio,
                        "fraction_of_ideal": (1 / ratio) * cost,
                    })
                    print(rows[-1], flush=True)
    meta = run_metadata(f"torch threads {torch.get_num_threads()}", repeats=args.repeats)
    lines = [
        "# Compact GBLR inference speed vs nn.Linear",
        "",
        f"{provenance(meta)} Time relative to `nn.Linear` of the same shape (median of {args.repeats} "
        "interleaved repeats), speedup, and fraction of the ideal speedup (speedup x cost). `exec` is the "
        "execution the compact layer's calibration picked. GBLR block cost includes padding to 8.",
        "",
        "| shape (in x out) | cost | tokens | variant | exec | time / dense | speedup | fraction of ideal |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['cost']} | {r['tokens']} | {r['variant']} | {r['execution']} | "
            f"{r['time_vs_dense']:.2f} | {r['speedup']:.2f}x | {r['fraction_of_ideal']:.2f} |"
        )
    write_results("compact_speed", meta, rows, lines)


if __name__ == "__main__":
    main()
